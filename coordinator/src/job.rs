//! Driving one job: plan, schedule tasks stage by stage, commit one snapshot, clean up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::prelude::SessionContext;
use nightshift_core::CoreError;
use nightshift_core::codec::encode_plan;
use nightshift_core::ids::{JobId, StageId, TaskKey};
use nightshift_core::planner::{JobPlan, PlanMode, PlanOptions, plan_job};
use nightshift_core::redact::{MASK, is_secret_name, redact};
use nightshift_core::session::{SessionOptions, new_session};
use nightshift_core::shuffle::resolve_shuffles;
use nightshift_core::sources::{SourceSummary, register_sources};
use nightshift_core::storage::Location;
use nightshift_core::table::{
    CatalogConfig, CommitOutcome, JobCommit, PIPELINE_PROPERTY, check_compatible,
    commit_job_snapshot, committed_before, ensure_table, find_job_snapshot, open_catalog,
    parse_table_ident, target_layout, with_table_types_for_nulls,
};
use nightshift_core::transport::{JobState, StateStore, TaskQueue};
use nightshift_proto::PROTOCOL_VERSION;
use nightshift_proto::v1::{self, task_definition, task_result::Outcome};
use nightshift_spec::ResolvedSpec;
use prost::Message;
use tracing::{Instrument, info, info_span, warn};

use crate::cleanup::{delete_scratch, sweep_job_data_files};
use crate::scheduler::{StageCount, StageTracker};

/// Default input bytes per scan task.
pub const DEFAULT_TARGET_TASK_BYTES: u64 = 64 << 20;
/// Default attempts per task.
pub const DEFAULT_MAX_TASK_ATTEMPTS: u32 = 3;
/// Ballista's setting for broadcast joins.
const BROADCAST_THRESHOLD_KEY: &str = "ballista.optimizer.broadcast_join_threshold_bytes";
/// Most partitions a stage is split into by default.
const MAX_DEFAULT_PARTITIONS: usize = 256;

/// Where a job runs: transports, catalog and scratch space.
#[derive(Clone)]
pub struct JobEnv {
    pub queue: Arc<dyn TaskQueue>,
    pub state: Arc<dyn StateStore>,
    pub catalog: CatalogConfig,
    /// Shuffle objects go under `<scratch>/<job-id>/`.
    pub scratch: Location,
    /// A running task whose lease is not renewed for this long is run again elsewhere.
    pub lease_ttl: Duration,
    /// How plans are cut: into stages exchanging through shuffle objects (workers anywhere),
    /// or into one in-process stage (every worker in this process: the embedded mode).
    pub plan_mode: PlanMode,
}

/// Default task lease: workers renew every third of it.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

/// Knobs of one run.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub job_id: JobId,
    /// Workers that will run tasks; the default partition count is at least this.
    pub workers: usize,
    pub target_task_bytes: Option<u64>,
    pub partitions: Option<usize>,
    pub max_task_attempts: Option<u32>,
}

/// Progress notifications, for progress bars and logs.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Planned {
        /// Every stage with 0 tasks done.
        stages: Vec<StageCount>,
        tasks: usize,
    },
    TaskFinished {
        done: usize,
        total: usize,
        rows: u64,
        stages: Vec<StageCount>,
    },
    Committing {
        files: usize,
    },
}

/// What a finished job did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobReport {
    pub job_id: String,
    pub pipeline: String,
    pub table: String,
    /// How the result was published: `append` or `overwrite` (every earlier row replaced).
    #[serde(default)]
    pub mode: String,
    /// The snapshot holding the job's rows; `None` when the result was empty.
    pub snapshot_id: Option<i64>,
    /// The job had been committed by an earlier run; nothing was done this time.
    pub already_committed: bool,
    pub rows: u64,
    pub files: usize,
    /// Table partitions the files went to, and the most files one partition received.
    #[serde(default)]
    pub partitions: usize,
    #[serde(default)]
    pub max_files_per_partition: usize,
    pub bytes: u64,
    pub stages: usize,
    pub tasks: usize,
    pub duration_ms: u64,
}

/// Why a job failed. Nothing was committed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The spec, a source, the SQL or the target is wrong; no task ran.
    #[error("{0}")]
    Invalid(CoreError),
    /// A task failed for good.
    #[error("stage {stage} task {partition} failed after {attempts} attempt(s): {message}")]
    TaskFailed {
        stage: u32,
        partition: u32,
        attempts: u32,
        message: String,
    },
    /// Infrastructure: catalog, storage or transport.
    #[error("{0}")]
    Internal(CoreError),
    /// Someone cancelled the job.
    #[error("cancelled")]
    Cancelled,
}

impl From<CoreError> for JobError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::Spec(_)
            | CoreError::Source { .. }
            | CoreError::Contract { .. }
            | CoreError::Sql(_)
            | CoreError::Access(_)
            | CoreError::Target { .. } => JobError::Invalid(e),
            other => JobError::Internal(other),
        }
    }
}

/// A job's outcome as one JSON object: `{"status": "succeeded", ...report}` or
/// `{"status": "failed", "job_id", "kind", "error"}`. The CLI prints it and the cluster
/// coordinator stores it for `nightshift run --cluster`.
pub fn outcome_json(job_id: &str, outcome: Result<&JobReport, &JobError>) -> serde_json::Value {
    match outcome {
        Ok(report) => {
            let mut value = serde_json::to_value(report).expect("report serializes");
            value["status"] = serde_json::json!("succeeded");
            value
        }
        Err(error) => serde_json::json!({
            "status": "failed",
            "job_id": job_id,
            "kind": match error {
                JobError::Invalid(_) => "invalid",
                JobError::TaskFailed { .. } => "task_failed",
                JobError::Internal(_) => "internal",
                JobError::Cancelled => "cancelled",
            },
            "error": redact(&error.to_string()),
        }),
    }
}

/// What `nightshift validate` prints.
#[derive(Debug)]
pub struct ValidationReport {
    pub sources: Vec<SourceSummary>,
    pub output_schema: SchemaRef,
    pub plan: JobPlan,
    pub partitions: usize,
}

/// Everything a job needs before its first task: a session with the sources, and the plan.
struct Planned {
    plan: JobPlan,
    sources: Vec<SourceSummary>,
    partitions: usize,
}

async fn plan(
    spec: &ResolvedSpec,
    options: &JobOptions,
    catalog: Option<&dyn iceberg::Catalog>,
    mode: PlanMode,
) -> Result<Planned, JobError> {
    let session = new_session(SessionOptions::default());
    let sources = register_sources(&session, spec, catalog).await?;
    let partitions = choose_partitions(spec, options, &sources);
    set_partitions(&session, partitions);
    if let Some(bytes) = spec.spec.execution.broadcast_join_threshold_bytes {
        session
            .state_ref()
            .write()
            .config_mut()
            .options_mut()
            .set(BROADCAST_THRESHOLD_KEY, &bytes.to_string())
            .map_err(|e| JobError::Internal(e.into()))?;
    }
    let plan_options = PlanOptions {
        mode,
        partition_by: spec.partition_by.clone(),
    };
    let plan = plan_job(&session, &options.job_id, &spec.sql, &plan_options).await?;
    Ok(Planned {
        plan,
        sources,
        partitions,
    })
}

fn choose_partitions(
    spec: &ResolvedSpec,
    options: &JobOptions,
    sources: &[SourceSummary],
) -> usize {
    if let Some(p) = options
        .partitions
        .or(spec.spec.execution.shuffle_partitions)
    {
        return p.max(1);
    }
    let task_bytes = options
        .target_task_bytes
        .or(spec.spec.execution.target_task_bytes)
        .unwrap_or(DEFAULT_TARGET_TASK_BYTES)
        .max(1);
    let input: u64 = sources.iter().map(|s| s.bytes).sum();
    let by_size = input.div_ceil(task_bytes) as usize;
    by_size.clamp(1, MAX_DEFAULT_PARTITIONS)
}

fn set_partitions(session: &SessionContext, partitions: usize) {
    session
        .state_ref()
        .write()
        .config_mut()
        .options_mut()
        .execution
        .target_partitions = partitions;
}

/// Parses, resolves sources, checks contracts, plans and checks the target; writes nothing.
pub async fn validate_job(
    spec: &ResolvedSpec,
    options: &JobOptions,
    catalog: Option<&CatalogConfig>,
) -> Result<ValidationReport, JobError> {
    let table = &spec.spec.target.table;
    let catalog = match catalog {
        Some(config) => Some(open_catalog(config).await?),
        None => None,
    };
    let planned = plan(spec, options, catalog.as_deref(), PlanMode::default()).await?;
    let mut existing = None;
    if let Some(catalog) = &catalog {
        let ident = parse_table_ident(table)?;
        if catalog
            .table_exists(&ident)
            .await
            .map_err(CoreError::from)?
        {
            existing = Some(catalog.load_table(&ident).await.map_err(CoreError::from)?);
        }
    }
    match existing {
        Some(existing) => {
            let result = with_table_types_for_nulls(&existing, &planned.plan.output_schema)?;
            let (schema, _) = target_layout(table, &result, &spec.partition_by)?;
            check_compatible(table, &existing, &schema, &spec.partition_by)?;
        }
        None => {
            target_layout(table, &planned.plan.output_schema, &spec.partition_by)?;
        }
    }
    Ok(ValidationReport {
        sources: planned.sources,
        output_schema: planned.plan.output_schema.clone(),
        partitions: planned.partitions,
        plan: planned.plan,
    })
}

/// Runs one job to the end: exactly one snapshot on success, nothing on failure.
pub async fn run_job(
    env: &JobEnv,
    spec: &ResolvedSpec,
    options: &JobOptions,
    on_event: &(dyn Fn(JobEvent) + Send + Sync),
) -> Result<JobReport, JobError> {
    let span = info_span!("job", job_id = %options.job_id, pipeline = %spec.spec.pipeline.name);
    run_job_inner(env, spec, options, on_event)
        .instrument(span)
        .await
}

async fn run_job_inner(
    env: &JobEnv,
    spec: &ResolvedSpec,
    options: &JobOptions,
    on_event: &(dyn Fn(JobEvent) + Send + Sync),
) -> Result<JobReport, JobError> {
    let started = Instant::now();
    let job = &options.job_id;
    let table_name = spec.spec.target.table.clone();
    let ident = parse_table_ident(&table_name)?;
    let catalog = open_catalog(&env.catalog).await?;
    let mut report = JobReport {
        job_id: job.to_string(),
        pipeline: spec.spec.pipeline.name.clone(),
        table: table_name.clone(),
        mode: spec.spec.target.mode.to_string(),
        snapshot_id: None,
        already_committed: false,
        rows: 0,
        files: 0,
        partitions: 0,
        max_files_per_partition: 0,
        bytes: 0,
        stages: 0,
        tasks: 0,
        duration_ms: 0,
    };

    // The table's history is the record of what was committed: a job id found there is done.
    if catalog
        .table_exists(&ident)
        .await
        .map_err(CoreError::from)?
    {
        let table = catalog.load_table(&ident).await.map_err(CoreError::from)?;
        if let Some(snapshot_id) = find_job_snapshot(&table, job) {
            info!(snapshot_id, "job was committed before; nothing to do");
            report.snapshot_id = Some(snapshot_id);
            report.already_committed = true;
            report.duration_ms = started.elapsed().as_millis() as u64;
            return Ok(report);
        }
    }

    let planned = plan(spec, options, Some(catalog.as_ref()), env.plan_mode).await?;
    let plan = planned.plan;
    report.stages = plan.stages.len();
    report.tasks = plan.total_tasks();
    info!(
        stages = report.stages,
        tasks = report.tasks,
        partitions = planned.partitions,
        "planned"
    );
    on_event(JobEvent::Planned {
        stages: plan
            .stages
            .iter()
            .map(|s| StageCount {
                stage: s.id.0,
                done: 0,
                total: s.tasks,
            })
            .collect(),
        tasks: report.tasks,
    });

    let existed = catalog
        .table_exists(&ident)
        .await
        .map_err(CoreError::from)?;
    let properties: HashMap<String, String> =
        spec.spec.target.properties.clone().into_iter().collect();
    let table = ensure_table(
        catalog.as_ref(),
        &ident,
        &plan.output_schema,
        &spec.partition_by,
        &properties,
    )
    .await?;
    let data_dir = Location::parse(
        &format!("{}/data", table.metadata().location()),
        std::path::Path::new("/"),
    )?;
    let table_output = table_output(&table)?;

    env.state.set_job_state(job, JobState::Running, "").await?;
    env.queue.open_results(job).await?;
    let mut ctx = RunContext {
        env,
        job,
        max_attempts: options
            .max_task_attempts
            .or(spec.spec.execution.max_task_attempts)
            .unwrap_or(DEFAULT_MAX_TASK_ATTEMPTS)
            .max(1),
        table_output,
        losers: Vec::new(),
        leased: HashMap::new(),
        in_flight: 0,
        recorded: recorded_outputs(env.state.as_ref(), job).await?,
    };
    if !ctx.recorded.is_empty() {
        info!(
            tasks = ctx.recorded.len(),
            "resuming: task outputs recorded by an earlier run are reused"
        );
    }
    let mut tracker = StageTracker::new(&plan);
    let outcome = ctx.run_stages(&mut tracker, on_event).await;

    let result = match outcome {
        Ok(()) => {
            let files = tracker.committed_files();
            report.rows = tracker.final_rows();
            report.bytes = tracker.final_bytes();
            report.files = files.len();
            let spread = nightshift_core::table::files_per_partition(&files);
            report.partitions = spread.partitions;
            report.max_files_per_partition = spread.max_files;
            on_event(JobEvent::Committing { files: files.len() });
            env.state
                .set_job_state(job, JobState::Committing, "")
                .await?;
            let committed = commit(&catalog, &env.catalog, &ident, job, spec, &files).await;
            match committed {
                Ok(outcome) => {
                    report.snapshot_id = outcome.as_ref().map(|o| o.snapshot_id);
                    report.already_committed =
                        outcome.as_ref().is_some_and(|o| o.already_committed);
                    let keep = outcome.map(|o| o.committed_files).unwrap_or_default();
                    sweep_job_data_files(&data_dir, job, &keep).await?;
                    Ok(())
                }
                Err(e) => Err(JobError::from(e)),
            }
        }
        Err(e) => Err(e),
    };

    delete_scratch(&env.scratch, job).await;
    if let Err(e) = env.queue.close_results(job).await {
        warn!(error = %e, "cannot delete the job's result queue");
    }
    env.state.clear_task_outputs(job).await?;
    match result {
        Ok(()) => {
            env.state
                .set_job_state(job, JobState::Succeeded, "")
                .await?;
            report.duration_ms = started.elapsed().as_millis() as u64;
            info!(snapshot_id = ?report.snapshot_id, rows = report.rows, files = report.files, "job succeeded");
            Ok(report)
        }
        Err(e) => {
            env.state
                .set_job_state(job, JobState::Failed, &e.to_string())
                .await?;
            // Files of this job id that another coordinator committed meanwhile stay.
            let keep = files_committed_elsewhere(catalog.as_ref(), &ident, job).await;
            if let Err(sweep) = sweep_job_data_files(&data_dir, job, &keep).await {
                warn!(error = %sweep, "cannot delete the failed job's data files");
            }
            if !existed {
                drop_if_empty(catalog.as_ref(), &ident).await;
            }
            Err(e)
        }
    }
}

/// Commits the job's files (appended, or replacing the table's rows), or nothing for an empty
/// result.
async fn commit(
    catalog: &Arc<dyn iceberg::Catalog>,
    config: &CatalogConfig,
    ident: &iceberg::TableIdent,
    job: &JobId,
    spec: &ResolvedSpec,
    files: &[String],
) -> Result<Option<CommitOutcome>, CoreError> {
    let mut summary = HashMap::new();
    summary.insert(
        PIPELINE_PROPERTY.to_string(),
        spec.spec.pipeline.name.clone(),
    );
    for (k, v) in &spec.params {
        // Whoever reads the table reads its snapshot summaries.
        let value = if is_secret_name(k) { MASK } else { v.as_str() };
        summary.insert(format!("nightshift.param.{k}"), value.to_string());
    }
    let commit = JobCommit {
        job,
        mode: spec.spec.target.mode,
        data_files_json: files,
        summary,
    };
    let outcome = commit_job_snapshot(catalog.as_ref(), config, ident, commit).await?;
    match &outcome {
        Some(o) => info!(
            snapshot_id = o.snapshot_id,
            again = o.already_committed,
            mode = %spec.spec.target.mode,
            "committed"
        ),
        None => info!("the result is empty; nothing to commit"),
    }
    Ok(outcome)
}

/// The data files of `job`'s snapshot, when the table has one although this run failed (the
/// same job id committed by another coordinator): a failed run must not delete them.
async fn files_committed_elsewhere(
    catalog: &dyn iceberg::Catalog,
    ident: &iceberg::TableIdent,
    job: &JobId,
) -> HashSet<String> {
    let Ok(table) = catalog.load_table(ident).await else {
        return HashSet::new();
    };
    match committed_before(&table, job).await {
        Ok(outcome) => outcome.map(|o| o.committed_files).unwrap_or_default(),
        Err(e) => {
            warn!(error = %e, "cannot read the table's history; keeping nothing");
            HashSet::new()
        }
    }
}

/// A table this job created and never committed to is dropped, so a failed first run
/// leaves the catalog as it found it.
async fn drop_if_empty(catalog: &dyn iceberg::Catalog, ident: &iceberg::TableIdent) {
    let Ok(table) = catalog.load_table(ident).await else {
        return;
    };
    if table.metadata().snapshots().len() == 0 {
        if let Err(e) = catalog.drop_table(ident).await {
            warn!(table = %ident, error = %e, "cannot drop the table created by the failed job");
        } else if let Ok(dir) =
            Location::parse(table.metadata().location(), std::path::Path::new("/"))
        {
            let _ = dir.delete_recursive().await;
        }
    }
}

/// What a final-stage task needs to write data files for `table`.
pub fn table_output(table: &iceberg::table::Table) -> Result<v1::TableOutput, CoreError> {
    let metadata = table.metadata();
    let json = |v: serde_json::Result<String>| {
        v.map_err(|e| CoreError::Protocol(format!("cannot serialize table metadata: {e}")))
    };
    Ok(v1::TableOutput {
        data_location: format!("{}/data", metadata.location()),
        schema_json: json(serde_json::to_string(metadata.current_schema().as_ref()))?,
        partition_spec_json: json(serde_json::to_string(
            metadata.default_partition_spec().as_ref(),
        ))?,
        format_version: metadata.format_version() as u32,
        target_file_size_bytes: metadata
            .properties()
            .get("write.target-file-size-bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(512 << 20),
    })
}

/// State of the scheduling loop.
struct RunContext<'a> {
    env: &'a JobEnv,
    job: &'a JobId,
    max_attempts: u32,
    table_output: v1::TableOutput,
    /// Results that lost to another attempt of the same task.
    losers: Vec<v1::TaskResult>,
    /// Attempts seen holding a lease, per running task.
    leased: HashMap<TaskKey, u32>,
    in_flight: usize,
    /// Winning outputs recorded in the state store by an earlier run of this job (a
    /// coordinator that restarted): those tasks are not run again.
    recorded: HashMap<TaskKey, v1::TaskResult>,
}

/// Task outputs the state store holds for `job`.
async fn recorded_outputs(
    state: &dyn StateStore,
    job: &JobId,
) -> Result<HashMap<TaskKey, v1::TaskResult>, CoreError> {
    let mut recorded = HashMap::new();
    for (key, bytes) in state.task_outputs(job).await? {
        match v1::TaskResult::decode(bytes.as_ref()) {
            Ok(result) => {
                recorded.insert(key, result);
            }
            Err(e) => warn!(%key, error = %e, "undecodable recorded output; the task runs again"),
        }
    }
    Ok(recorded)
}

impl RunContext<'_> {
    /// Publishes ready stages and consumes results until every stage is complete or a task
    /// fails for good. On failure it waits for the tasks still running, so nothing writes
    /// after cleanup.
    async fn run_stages(
        &mut self,
        tracker: &mut StageTracker,
        on_event: &(dyn Fn(JobEvent) + Send + Sync),
    ) -> Result<(), JobError> {
        let mut stage_plans: BTreeMap<StageId, Bytes> = BTreeMap::new();
        let mut failure: Option<JobError> = None;
        loop {
            match failure.take() {
                None => {
                    // A stage completed from recorded outputs makes its dependents ready.
                    loop {
                        let ready = tracker.ready();
                        if ready.is_empty() {
                            break;
                        }
                        for id in ready {
                            let bytes = self.start_stage(tracker, id).await?;
                            stage_plans.insert(id, bytes);
                        }
                    }
                    if tracker.all_complete() {
                        return Ok(());
                    }
                }
                Some(e) if self.in_flight == 0 => return Err(e),
                Some(e) => failure = Some(e),
            }
            if failure.is_none() && self.env.state.cancel_requested(self.job).await? {
                info!(
                    "job cancelled; waiting for {} running task(s)",
                    self.in_flight
                );
                self.env
                    .state
                    .set_job_state(self.job, JobState::Failed, "cancelled")
                    .await?;
                failure = Some(JobError::Cancelled);
                continue;
            }
            let next =
                tokio::time::timeout(self.env.lease_ttl / 3, self.env.queue.next_result(self.job));
            let Ok(next) = next.await else {
                if failure.is_none()
                    && let Err(e) = self.check_leases(tracker, &stage_plans).await
                {
                    self.env
                        .state
                        .set_job_state(self.job, JobState::Failed, &e.to_string())
                        .await?;
                    failure = Some(e);
                }
                continue;
            };
            let Some(delivery) = next? else {
                return Err(failure.unwrap_or_else(|| {
                    JobError::Internal(CoreError::Transport("result queue closed".into()))
                }));
            };
            let result = v1::TaskResult::decode(delivery.payload());
            delivery.ack().await?;
            let result = match result {
                Ok(r) if r.job_id == self.job.as_str() => r,
                Ok(r) => {
                    warn!(other_job = %r.job_id, "result of another job; ignored");
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "undecodable result; ignored");
                    continue;
                }
            };
            self.in_flight = self.in_flight.saturating_sub(1);
            if failure.is_some() {
                continue;
            }
            if let Err(e) = self
                .handle_result(tracker, &stage_plans, result, on_event)
                .await
            {
                info!(error = %e, "job failing; waiting for {} running task(s)", self.in_flight);
                self.env
                    .state
                    .set_job_state(self.job, JobState::Failed, &e.to_string())
                    .await?;
                failure = Some(e);
            }
        }
    }

    /// A task whose attempt was seen running (leased) and whose lease has expired without a
    /// result lost its worker (killed, frozen, partitioned away): run it again, counting the
    /// attempt.
    async fn check_leases(
        &mut self,
        tracker: &mut StageTracker,
        stage_plans: &BTreeMap<StageId, Bytes>,
    ) -> Result<(), JobError> {
        let mut expired = Vec::new();
        for progress in tracker.stages.iter().filter(|s| s.started) {
            for (partition, attempt) in &progress.attempts {
                if progress.done.contains_key(partition) {
                    continue;
                }
                let key = TaskKey {
                    stage: progress.stage.id,
                    partition: *partition,
                };
                match self.env.state.lease(self.job, key).await? {
                    Some(leased) => {
                        self.leased.insert(key, leased);
                    }
                    None if self.leased.get(&key) == Some(attempt) => {
                        expired.push((key, *attempt, progress.stage.is_final));
                    }
                    None => {}
                }
            }
        }
        for (key, attempt, is_final) in expired {
            self.leased.remove(&key);
            if attempt >= self.max_attempts {
                return Err(JobError::TaskFailed {
                    stage: key.stage.0,
                    partition: key.partition,
                    attempts: attempt,
                    message: "its worker stopped renewing the task lease".into(),
                });
            }
            warn!(%key, attempt, "task lease expired; running the task again");
            let progress = tracker.get_mut(key.stage).expect("started stage");
            progress.attempts.insert(key.partition, attempt + 1);
            let plan = stage_plans
                .get(&key.stage)
                .expect("started stage has a plan")
                .clone();
            self.publish(key.stage, key.partition, attempt + 1, &plan, is_final)
                .await?;
        }
        Ok(())
    }

    async fn start_stage(
        &mut self,
        tracker: &mut StageTracker,
        id: StageId,
    ) -> Result<Bytes, JobError> {
        let outputs = tracker.outputs();
        let progress = tracker.get_mut(id).expect("ready stage exists");
        progress.started = true;
        let plan: Arc<dyn datafusion::physical_plan::ExecutionPlan> = progress.stage.plan.clone();
        let resolved = resolve_shuffles(plan, &outputs)?;
        let bytes = encode_plan(resolved).map_err(CoreError::from)?;
        info!(stage = %id, tasks = progress.stage.tasks, plan_bytes = bytes.len(), "stage started");
        let is_final = progress.stage.is_final;
        for partition in 0..progress.stage.tasks as u32 {
            progress.attempts.insert(partition, 1);
        }
        let tasks = progress.stage.tasks as u32;
        for partition in 0..tasks {
            let key = TaskKey {
                stage: id,
                partition,
            };
            if let Some(result) = self.recorded.remove(&key) {
                progress.done.insert(partition, result);
                continue;
            }
            self.publish(id, partition, 1, &bytes, is_final).await?;
        }
        Ok(bytes)
    }

    async fn publish(
        &mut self,
        stage: StageId,
        partition: u32,
        attempt: u32,
        plan: &Bytes,
        is_final: bool,
    ) -> Result<(), JobError> {
        let output = if is_final {
            task_definition::Output::Table(self.table_output.clone())
        } else {
            task_definition::Output::Shuffle(v1::ShuffleOutput {
                prefix: self
                    .env
                    .scratch
                    .join(&format!("{}/stage-{}", self.job, stage))
                    .as_url_string(),
            })
        };
        let task = v1::TaskDefinition {
            protocol_version: PROTOCOL_VERSION,
            job_id: self.job.to_string(),
            stage_id: stage.0,
            partition,
            attempt,
            stage_plan: plan.to_vec(),
            output: Some(output),
            pipeline: String::new(),
        };
        self.env
            .queue
            .publish_task(task.encode_to_vec().into())
            .await?;
        self.in_flight += 1;
        Ok(())
    }

    async fn handle_result(
        &mut self,
        tracker: &mut StageTracker,
        stage_plans: &BTreeMap<StageId, Bytes>,
        result: v1::TaskResult,
        on_event: &(dyn Fn(JobEvent) + Send + Sync),
    ) -> Result<(), JobError> {
        let key = StageTracker::task_key(&result);
        let Some(progress) = tracker.get_mut(key.stage) else {
            warn!(%key, "result for an unknown stage; ignored");
            return Ok(());
        };
        if let Some(Outcome::Failed(failed)) = &result.outcome {
            if progress.done.contains_key(&key.partition) {
                return Ok(()); // another attempt already won
            }
            let attempts = progress.attempts.get(&key.partition).copied().unwrap_or(1);
            if failed.retryable && attempts < self.max_attempts && result.attempt == attempts {
                warn!(%key, attempt = attempts, error = %failed.message, "task failed; retrying");
                progress.attempts.insert(key.partition, attempts + 1);
                let is_final = progress.stage.is_final;
                let plan = stage_plans
                    .get(&key.stage)
                    .expect("started stage has a plan")
                    .clone();
                self.publish(key.stage, key.partition, attempts + 1, &plan, is_final)
                    .await?;
                return Ok(());
            }
            if result.attempt < attempts {
                return Ok(()); // a newer attempt is running
            }
            return Err(JobError::TaskFailed {
                stage: key.stage.0,
                partition: key.partition,
                attempts,
                message: failed.message.clone(),
            });
        }
        let won = self
            .env
            .state
            .claim_task_output(self.job, key, result.encode_to_vec().into())
            .await?;
        if !won || progress.done.contains_key(&key.partition) {
            self.losers.push(result);
            return Ok(());
        }
        progress.done.insert(key.partition, result);
        let (done, total) = tracker.progress();
        on_event(JobEvent::TaskFinished {
            done,
            total,
            rows: tracker.final_rows(),
            stages: tracker.stage_counts(),
        });
        Ok(())
    }
}
