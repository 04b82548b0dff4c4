//! The embedded mode: a coordinator and N workers in one process, sharing an in-process
//! queue and state store, writing to a local warehouse with a SQLite catalog.
//!
//! The workers share one memory pool and spill directory (`--memory-limit`, `--spill-dir`),
//! and by default a job is planned as one in-process stage whose tasks share a plan
//! instance (`PlanMode::SingleProcess`): no shuffle files, exchanges in memory, one task per
//! worker. The table write and the one-snapshot commit are the cluster's code.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nightshift_coordinator::cleanup::run_late_sweeps;
use nightshift_coordinator::{JobEnv, JobError, JobEvent, JobOptions, JobReport, run_job};
use nightshift_core::CoreError;
use nightshift_core::planner::PlanMode;
use nightshift_core::session::{MemorySettings, SessionOptions, new_session};
use nightshift_core::storage::Location;
use nightshift_core::table::CatalogConfig;
use nightshift_core::transport::memory::{MemoryQueue, MemoryState};
use nightshift_spec::ResolvedSpec;
use nightshift_worker::Worker;

/// Where the scratch space of embedded jobs lives inside the warehouse.
pub const SCRATCH_DIR: &str = ".nightshift/jobs";

/// The embedded environment's settings.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub warehouse: PathBuf,
    pub workers: usize,
    /// The process's memory limit (shared by its workers) and spill directory.
    pub memory: MemorySettings,
    /// Run stages through shuffle files as a cluster does, instead of one in-process stage.
    pub staged: bool,
    /// Emit OpenLineage events where the environment says (off for `nightshift check`,
    /// whose throw-away runs are no lineage).
    pub lineage: bool,
}

impl EmbeddedOptions {
    /// `workers` in-process workers with the default memory limit, one in-process stage.
    pub fn new(warehouse: PathBuf, workers: usize) -> Self {
        let workers = workers.max(1);
        EmbeddedOptions {
            warehouse,
            workers,
            memory: MemorySettings::new(None, None, workers),
            staged: false,
            lineage: true,
        }
    }
}

/// The warehouse as a location, created if missing. An unwritable warehouse is reported
/// before any work starts.
pub fn prepare_warehouse(dir: &Path) -> Result<Location, CoreError> {
    let cwd = std::env::current_dir().map_err(|e| CoreError::io("current directory", e))?;
    let location = Location::parse(&dir.display().to_string(), &cwd)?;
    let path = location.local_path().expect("a parsed local path");
    std::fs::create_dir_all(&path)
        .map_err(|e| CoreError::io(format!("cannot create warehouse {}", path.display()), e))?;
    // A probe file of its own (deleted when dropped): runs started together into one
    // warehouse shared one name, and one run's removal failed the other's with "not
    // writable: No such file or directory".
    tempfile::Builder::new()
        .prefix(".nightshift-write-test-")
        .tempfile_in(&path)
        .map_err(|e| CoreError::io(format!("warehouse {} is not writable", path.display()), e))?;
    Ok(location)
}

/// Catalog settings of the embedded warehouse at `dir`.
pub fn embedded_catalog(warehouse: &Location) -> Result<CatalogConfig, CoreError> {
    CatalogConfig::embedded(warehouse)
}

/// Runs `spec` with `options.workers` in-process workers.
pub async fn run_embedded(
    spec: &ResolvedSpec,
    embedded: &EmbeddedOptions,
    options: &JobOptions,
    on_event: &(dyn Fn(JobEvent) + Send + Sync),
) -> Result<JobReport, JobError> {
    let warehouse = prepare_warehouse(&embedded.warehouse)?;
    let queue = Arc::new(MemoryQueue::default());
    let state = Arc::new(MemoryState::for_one_process());
    let runtime = embedded.memory.runtime()?;
    let task_memory = Some(embedded.memory.per_task());
    let workers: Vec<_> = (0..embedded.workers.max(1))
        .map(|i| {
            let session = new_session(SessionOptions {
                runtime: Some(runtime.clone()),
                task_memory,
                ..SessionOptions::default()
            });
            let worker = Worker::new(format!("embedded-{i}"), queue.clone(), state.clone())
                .with_session(session);
            tokio::spawn(async move { worker.run().await })
        })
        .collect();
    let mut options = options.clone();
    let plan_mode = if embedded.staged {
        PlanMode::Distributed { task_memory }
    } else {
        // A partition of a shared plan runs once: a retry could only fail with a message
        // that hides the first failure's.
        options.max_task_attempts = Some(1);
        PlanMode::SingleProcess {
            tasks: options.partitions.unwrap_or(embedded.workers).max(1),
            task_memory,
        }
    };
    let mut env = JobEnv {
        plan_mode,
        ..JobEnv::new(
            queue.clone(),
            state,
            embedded_catalog(&warehouse)?,
            warehouse.join(SCRATCH_DIR),
        )
    };
    if !embedded.lineage {
        env.lineage = None;
    }
    // Each run leaves its record beside the warehouse's tables, for `nightshift report`.
    let keep_record = |event: JobEvent| {
        if let JobEvent::Finished(record) = &event {
            crate::report::save_embedded_record(&embedded.warehouse, record);
        }
        on_event(event);
    };
    let result = run_job(&env, spec, &options, &keep_record).await;
    queue.close();
    for worker in workers {
        match worker.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "worker stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "worker panicked"),
        }
    }
    // Every worker has stopped, so nothing writes any more: the late sweep can run now.
    if let Err(e) = run_late_sweeps(&env, i64::MAX).await {
        tracing::warn!(error = %e, "late sweep failed");
    }
    result
}
