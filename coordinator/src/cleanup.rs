//! Removing what jobs wrote but did not commit: data files of losing, failed or late task
//! attempts, and shuffle objects.
//!
//! Architecture invariant: every deletion of data files goes through [`sweep_job_files`],
//! which deletes a file only when (1) it lies in the table's own layout ([`is_table_file`]:
//! not in another table nested in its directory, such as `ns.t.data` in `ns.t`'s `data`),
//! (2) its name parses ([`names`]) as written by exactly this job — never by prefix, so
//! `etl` never touches `etl-sales`'s files — and (3) no snapshot of the table references
//! it, current or historical, whoever committed it ([`TableReferences`], read after the
//! listing). Only the coordinator owning the job sweeps
//! it, so no other coordinator can be committing the same job's files meanwhile.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use iceberg::{Catalog, TableIdent};
use nightshift_core::Result;
use nightshift_core::ids::JobId;
use nightshift_core::names::{self, parse_data_file_name};
use nightshift_core::storage::{Location, delete_objects, list_objects, list_objects_meta};
use nightshift_core::table::files::is_table_file;
use nightshift_core::table::{TableReferences, open_catalog, parse_table_ident};
use nightshift_core::transport::StateStore;
use tracing::{debug, info, warn};

use crate::job::JobEnv;

/// What one sweep of a job's data files did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Unreferenced files of the job, deleted.
    pub deleted: usize,
    /// Files of the job that a snapshot references, kept.
    pub kept: usize,
}

/// Whether `location`, below the table location `root`, is a file of `job` in the table's
/// own layout: not another table's nested in its directory, and written by exactly this job
/// (by its parsed name, never by prefix).
fn is_job_file(root: &Location, job: &JobId, location: &Location) -> bool {
    let path = location.url().path();
    is_table_file(root.url().path(), path)
        && parse_data_file_name(path).is_some_and(|name| name.attempt.job == *job)
}

/// The files among `listed` (below the table location `root`) to delete: files of `job`
/// ([`is_job_file`]) referenced by no snapshot.
pub fn unreferenced_job_files<'a>(
    listed: &'a [Location],
    root: &Location,
    job: &JobId,
    references: &TableReferences,
) -> Vec<&'a Location> {
    listed
        .iter()
        .filter(|location| {
            is_job_file(root, job, location) && !references.references(location.url().path())
        })
        .collect()
}

/// Deletes the data files `job` wrote into `ident` that no snapshot of it references.
/// `just_committed` are files the caller knows the job's snapshot holds: when the job's
/// files are exactly those, the table's history need not be read.
pub async fn sweep_job_files(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    job: &JobId,
    just_committed: &TableReferences,
) -> Result<Swept> {
    if !catalog.table_exists(ident).await? {
        return Ok(Swept::default());
    }
    let table = catalog.load_table(ident).await?;
    let root = Location::parse(table.metadata().location(), std::path::Path::new("/"))?;
    let listed: Vec<Location> = list_objects(&root.join("data"))
        .await?
        .into_iter()
        .map(|(location, _)| location)
        .filter(|location| is_job_file(&root, job, location))
        .collect();
    if unreferenced_job_files(&listed, &root, job, just_committed).is_empty() {
        return Ok(Swept {
            deleted: 0,
            kept: listed.len(),
        });
    }
    // References are read after the listing: a file listed above and committed before this
    // load is seen as referenced.
    let table = catalog.load_table(ident).await?;
    let references = TableReferences::load(&table).await?;
    let doomed: Vec<Location> = unreferenced_job_files(&listed, &root, job, &references)
        .into_iter()
        .cloned()
        .collect();
    delete_objects(&doomed).await?;
    let swept = Swept {
        deleted: doomed.len(),
        kept: listed.len() - doomed.len(),
    };
    debug!(deleted = swept.deleted, kept = swept.kept, table = %ident, "swept the job's data files");
    Ok(swept)
}

/// Deletes the job's scratch directory (shuffle outputs of every attempt).
pub async fn delete_scratch(scratch: &Location, job: &JobId) {
    let dir = scratch.join(names::job_scratch_dir(job));
    match dir.delete_recursive().await {
        Ok(_) => debug!(%dir, "deleted job scratch"),
        Err(e) => warn!(%dir, error = %e, "cannot delete job scratch; the sweeper will retry"),
    }
}

/// Runs the late sweeps due by `now_ms`: each ended job's unreferenced data files and its
/// scratch, once more, for task attempts that were still writing when the job ended. A job
/// owned by a running coordinator (it was submitted again) is left for later.
pub async fn run_late_sweeps(env: &JobEnv, now_ms: i64) -> Result<Vec<JobId>> {
    let due = env.state.due_sweeps(now_ms).await?;
    if due.is_empty() {
        return Ok(Vec::new());
    }
    let catalog = open_catalog(&env.catalog).await?;
    let ttl = crate::job::ownership_ttl(env.lease_ttl);
    let mut done = Vec::new();
    for (job, table) in due {
        if !env.state.acquire_job(&job, &env.owner, ttl).await? {
            continue;
        }
        // The job has ended: no run of it may adopt a winner whose files are swept now.
        let swept = match env.state.clear_task_outputs(&job).await {
            Ok(()) => sweep_target_and_rejects(catalog.as_ref(), &table, &job).await,
            Err(e) => Err(e),
        };
        match swept {
            Ok(swept) => {
                delete_scratch(&env.scratch, &job).await;
                env.state.sweep_done(&job).await?;
                if swept.deleted > 0 {
                    info!(job_id = %job, deleted = swept.deleted, "late sweep removed files of attempts that outlived the job");
                }
                done.push(job.clone());
            }
            Err(e) => warn!(job_id = %job, error = %e, "late sweep failed; retrying later"),
        }
        env.state.release_job(&job, &env.owner).await?;
    }
    Ok(done)
}

/// Sweeps the job's files from its target and from the target's rejects table (which holds
/// files only when a check of the job quarantined rows; a missing table is nothing to sweep).
/// Both go through [`sweep_job_files`], so in the rejects table too a file is deleted only
/// when its name parses as this job's and no snapshot of that table references it.
async fn sweep_target_and_rejects(
    catalog: &dyn Catalog,
    target: &str,
    job: &JobId,
) -> Result<Swept> {
    let nothing = TableReferences::default();
    let mut swept = sweep_job_files(catalog, &parse_table_ident(target)?, job, &nothing).await?;
    let rejects = parse_table_ident(&nightshift_spec::rejects_table(target))?;
    let more = sweep_job_files(catalog, &rejects, job, &nothing).await?;
    swept.deleted += more.deleted;
    swept.kept += more.kept;
    Ok(swept)
}

/// The sweeper: deletes the scratch directories of jobs that are not running and whose newest
/// object is older than `ttl` — what jobs of crashed coordinators left behind. Returns the
/// job ids swept.
pub async fn sweep_scratch(
    scratch: &Location,
    state: &dyn StateStore,
    ttl: Duration,
) -> Result<Vec<String>> {
    let root = scratch.url().path().trim_end_matches('/').to_string();
    let mut newest: HashMap<JobId, SystemTime> = HashMap::new();
    for (location, meta) in list_objects_meta(scratch).await? {
        let path = location.url().path();
        let Some(job) = path.strip_prefix(&root).and_then(names::scratch_owner) else {
            continue;
        };
        let modified: SystemTime = meta.last_modified.into();
        let entry = newest.entry(job).or_insert(modified);
        *entry = (*entry).max(modified);
    }
    let now = SystemTime::now();
    let mut swept = Vec::new();
    for (job, modified) in newest {
        if now.duration_since(modified).unwrap_or_default() < ttl {
            continue;
        }
        if matches!(
            state.job_state(&job).await,
            Ok(Some((state, _))) if !state.is_terminal()
        ) {
            continue;
        }
        let dir = scratch.join(names::job_scratch_dir(&job));
        match dir.delete_recursive().await {
            Ok(_) => {
                debug!(%dir, "swept scratch of an abandoned job");
                swept.push(job.to_string());
            }
            Err(e) => warn!(%dir, error = %e, "cannot sweep scratch"),
        }
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightshift_core::names::{AttemptId, DataFileName};

    fn file(job: &str, stage: u32) -> String {
        let name = DataFileName {
            attempt: AttemptId::new(JobId::parse(job).unwrap(), stage, 0, 1),
            sequence: 0,
        };
        format!("/w/ns/t/data/day=2024-01-01/{name}")
    }

    fn at(path: &str) -> Location {
        Location::parse(path, std::path::Path::new("/")).unwrap()
    }

    #[test]
    fn only_the_jobs_own_unreferenced_files_are_deleted() {
        let ours_committed = file("etl", 2);
        let ours_loser = file("etl", 2);
        let longer_id = file("etl-sales-2024", 1);
        let tricky_id = file("etl-s1-p0-a1-deadbeef", 1);
        let foreign = "/w/ns/t/data/00000-0-5b6a7980-00001.parquet".to_string();
        let listed: Vec<Location> = [
            &ours_committed,
            &ours_loser,
            &longer_id,
            &tricky_id,
            &foreign,
        ]
        .into_iter()
        .map(|p| at(p))
        .collect();
        let mut references = TableReferences::default();
        references.insert(&ours_committed);
        let doomed = unreferenced_job_files(
            &listed,
            &at("/w/ns/t"),
            &JobId::parse("etl").unwrap(),
            &references,
        );
        assert_eq!(doomed, vec![&listed[1]]);
    }

    /// `ns.t.data` (namespace `ns.t`) lives in `ns.t`'s data directory; a job id shared by
    /// both tables' runs (one per night, say) must not let `ns.t`'s sweep delete the other
    /// table's committed files, which `ns.t`'s snapshots do not reference.
    #[test]
    fn files_of_a_table_nested_in_the_data_directory_are_not_the_tables() {
        let nested =
            "/w/ns/t/data/data/".to_string() + file("nightly", 1).rsplit('/').next().unwrap();
        let own = file("nightly", 1);
        let listed = vec![at(&nested), at(&own)];
        let job = JobId::parse("nightly").unwrap();
        let doomed =
            unreferenced_job_files(&listed, &at("/w/ns/t"), &job, &TableReferences::default());
        assert_eq!(doomed, vec![&listed[1]]);
        let doomed = unreferenced_job_files(
            &listed,
            &at("/w/ns/t/data"),
            &job,
            &TableReferences::default(),
        );
        assert_eq!(doomed, vec![&listed[0]]);
    }

    #[test]
    fn a_referenced_file_is_kept_whatever_its_name_says() {
        let ours = file("daily", 1);
        let listed = vec![at(&ours)];
        let mut references = TableReferences::default();
        references.insert(&format!("file://{ours}"));
        assert!(
            unreferenced_job_files(
                &listed,
                &at("/w/ns/t"),
                &JobId::parse("daily").unwrap(),
                &references
            )
            .is_empty()
        );
    }
}
