//! Removing what a job wrote but did not commit: shuffle objects, data files of losing or
//! failed attempts, and — for a failed job — every data file it wrote.

use std::collections::HashSet;

use nightshift_core::Result;
use nightshift_core::ids::JobId;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use nightshift_core::storage::{Location, delete_objects, list_objects, list_objects_meta};
use nightshift_core::transport::{JobState, StateStore};
use tracing::{debug, warn};

/// Deletes the job's scratch directory (shuffle outputs of every attempt).
pub async fn delete_scratch(scratch: &Location, job: &JobId) {
    let dir = scratch.join(job.as_str());
    match dir.delete_recursive().await {
        Ok(_) => debug!(%dir, "deleted job scratch"),
        Err(e) => warn!(%dir, error = %e, "cannot delete job scratch; the sweeper will retry"),
    }
}

/// Deletes every data file under `data_dir` that `job` wrote and that is not in `keep`.
/// Files are found by name (`<job-id>-s<stage>-p<partition>-a<attempt>-…`), so files of an
/// attempt that never reported are found too.
pub async fn sweep_job_data_files(
    data_dir: &Location,
    job: &JobId,
    keep: &HashSet<String>,
) -> Result<usize> {
    let prefix = format!("{}-s", job.as_str());
    let listed = list_objects(data_dir).await?;
    let doomed: Vec<Location> = listed
        .into_iter()
        .map(|(loc, _)| loc)
        .filter(|loc| {
            let path = loc.url().path();
            let name = path.rsplit('/').next().unwrap_or_default();
            name.starts_with(&prefix) && !keep.contains(&loc.to_iceberg_string())
        })
        .collect();
    delete_objects(&doomed).await?;
    Ok(doomed.len())
}

/// The sweeper: deletes the scratch directories of jobs that are not running and whose newest
/// object is older than `ttl` — what jobs of crashed coordinators left behind. Returns the
/// job ids swept.
pub async fn sweep_scratch(
    scratch: &Location,
    state: &dyn StateStore,
    ttl: Duration,
) -> Result<Vec<String>> {
    let prefix = scratch.url().path().trim_end_matches('/').to_string();
    let mut newest: HashMap<String, SystemTime> = HashMap::new();
    for (location, meta) in list_objects_meta(scratch).await? {
        let path = location.url().path().to_string();
        let Some(job) = path
            .strip_prefix(&prefix)
            .and_then(|rest| rest.trim_start_matches('/').split('/').next())
            .filter(|j| !j.is_empty())
        else {
            continue;
        };
        let modified: SystemTime = meta.last_modified.into();
        let entry = newest.entry(job.to_string()).or_insert(modified);
        *entry = (*entry).max(modified);
    }
    let now = SystemTime::now();
    let mut swept = Vec::new();
    for (job, modified) in newest {
        if now.duration_since(modified).unwrap_or_default() < ttl {
            continue;
        }
        if let Ok(id) = JobId::parse(&job)
            && matches!(
                state.job_state(&id).await,
                Ok(Some((JobState::Running | JobState::Committing, _)))
            )
        {
            continue;
        }
        let dir = scratch.join(&job);
        match dir.delete_recursive().await {
            Ok(_) => {
                debug!(%dir, "swept scratch of an abandoned job");
                swept.push(job);
            }
            Err(e) => warn!(%dir, error = %e, "cannot sweep scratch"),
        }
    }
    Ok(swept)
}
