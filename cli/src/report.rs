//! `nightshift report`: a job's HTML report page, from the record its run left — in the
//! warehouse for embedded runs (`<warehouse>/.nightshift/runs/<job>.json`), in Redis for a
//! cluster's.

use std::path::{Path, PathBuf};

use nightshift_cluster::ClusterConfig;
use nightshift_cluster::redis_state::RedisState;
use nightshift_coordinator::job::record::RunRecord;
use nightshift_core::CoreError;
use nightshift_core::ids::JobId;

/// Where an embedded warehouse keeps its runs' records.
pub const RUNS_DIR: &str = ".nightshift/runs";

/// Which job's report.
pub enum Which {
    Job(String),
    Last,
}

/// Keeps `record` in the warehouse's runs directory; a record that cannot be written is a
/// warning, never a failed job.
pub fn save_embedded_record(warehouse: &Path, record: &RunRecord) {
    let dir = warehouse.join(RUNS_DIR);
    let path = dir.join(format!("{}.json", record.report.job_id));
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        // Through a temporary name, so a reader never sees half a record.
        let partial = dir.join(format!(".{}.json.partial", record.report.job_id));
        std::fs::write(&partial, json)?;
        std::fs::rename(&partial, &path)
    });
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the run's report record");
    }
}

/// The record of `which` job run against the embedded warehouse.
pub fn embedded_record(warehouse: &Path, which: &Which) -> Result<RunRecord, String> {
    let dir = warehouse.join(RUNS_DIR);
    let path = match which {
        Which::Job(job) => {
            let job = JobId::parse(job).map_err(|e| format!("`{job}`: {e}"))?;
            dir.join(format!("{job}.json"))
        }
        Which::Last => newest_record(&dir)?,
    };
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "no record of that job in {} (records are kept for jobs run with this warehouse)",
            dir.display()
        ),
        _ => format!("cannot read {}: {e}", path.display()),
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a run record: {e}", path.display()))
}

/// The most recently written record in `dir`.
fn newest_record(dir: &Path) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(dir).map_err(|_| {
        format!(
            "no job has run with this warehouse yet ({} is missing)",
            dir.display()
        )
    })?;
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, path)| path)
        .ok_or_else(|| {
            format!(
                "no job has run with this warehouse yet ({} is empty)",
                dir.display()
            )
        })
}

/// The record of `which` job of the cluster (`Last`: the newest submitted).
pub async fn cluster_record(config: &ClusterConfig, which: &Which) -> Result<RunRecord, String> {
    let state = RedisState::connect(&config.redis.url, &config.redis.prefix)
        .await
        .map_err(|e: CoreError| e.to_string())?;
    let job = match which {
        Which::Job(job) => job.clone(),
        Which::Last => state
            .list_jobs(None, 0, 1)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .next()
            .ok_or("the cluster has no job on record")?,
    };
    let job = JobId::parse(&job).map_err(|e| format!("`{job}`: {e}"))?;
    let json = state
        .run_record(&job)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!("job {job} has no report yet: it is unknown, or has not ended (the coordinator's /jobs/{job}/report shows its progress)")
        })?;
    serde_json::from_str(&json).map_err(|e| format!("the record of job {job} is unreadable: {e}"))
}

/// Writes the page of `record` to `out` (default `report-<job>.html`); returns the path.
pub fn write_page(record: &RunRecord, out: Option<&Path>) -> Result<PathBuf, String> {
    let path = out.map_or_else(
        || PathBuf::from(format!("report-{}.html", record.report.job_id)),
        Path::to_path_buf,
    );
    std::fs::write(&path, nightshift_coordinator::report_page::render(record))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}
