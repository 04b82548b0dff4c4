//! Driving one job: plan, schedule tasks stage by stage, commit one snapshot, clean up.
//!
//! - [`driver`] runs a job as phases (plan → run stages → commit) that all end in one
//!   finish path, which records the outcome and cleans up, whatever happened;
//! - [`stages`] publishes tasks and acts on results and leases (the decisions themselves
//!   are the pure [`StageTracker`](crate::scheduler::StageTracker));
//! - [`ownership`] makes one coordinator at a time run a job.

mod driver;
mod ownership;
pub mod record;
mod set_checks;
mod stages;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::prelude::SessionContext;
use iceberg::table::Table;
use nightshift_core::CoreError;
use nightshift_core::checks::{self, CheckResult, RowCheckCounter};
use nightshift_core::ids::JobId;
use nightshift_core::planner::{JobPlan, PlanMode, PlanOptions, output_schema, plan_job};
use nightshift_core::redact::redact;
use nightshift_core::session::{
    BROADCAST_THRESHOLD_KEY, SessionOptions, broadcast_threshold_for, checking_session, new_session,
};
use nightshift_core::sources::{SourceSummary, register_merge_target, register_sources};
use nightshift_core::storage::Location;
use nightshift_core::table::{
    CatalogConfig, check_compatible, load_if_exists, open_catalog, parse_table_ident,
    target_layout, with_table_types_for_nulls,
};
use nightshift_core::transport::{StateStore, TaskQueue};
use nightshift_spec::{ResolvedSpec, WriteMode};

pub use driver::{now_ms, ownership_ttl, run_job};
pub use nightshift_core::table::table_output;

use crate::admission::RecentTables;
use crate::scheduler::StageCount;

/// Default input bytes per scan task.
pub const DEFAULT_TARGET_TASK_BYTES: u64 = 64 << 20;
/// Default attempts per task.
pub const DEFAULT_MAX_TASK_ATTEMPTS: u32 = 3;
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
    /// This coordinator (unique per process): its runs own jobs as `<owner>/run-<uuid>`, its
    /// late sweeper as `<owner>`.
    pub owner: String,
    /// How long after a job ends its files are swept once more, for task attempts that were
    /// still writing when it ended.
    pub late_sweep_after: Duration,
    /// Where each job's OpenLineage run events go (none: not emitted).
    pub lineage: Option<Arc<crate::openlineage::LineageSink>>,
}

impl JobEnv {
    /// An environment with default lease and sweep timings and a fresh owner id.
    pub fn new(
        queue: Arc<dyn TaskQueue>,
        state: Arc<dyn StateStore>,
        catalog: CatalogConfig,
        scratch: Location,
    ) -> Self {
        JobEnv {
            queue,
            state,
            catalog,
            scratch,
            lease_ttl: DEFAULT_LEASE_TTL,
            plan_mode: PlanMode::default(),
            owner: format!("coordinator-{}", uuid::Uuid::now_v7()),
            late_sweep_after: DEFAULT_LATE_SWEEP_AFTER,
            lineage: crate::openlineage::LineageSink::from_env().map(Arc::new),
        }
    }
}

/// Default task lease: workers renew every third of it.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// Default delay of the late sweep after a job ends.
pub const DEFAULT_LATE_SWEEP_AFTER: Duration = Duration::from_secs(15);

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

impl JobOptions {
    /// Options for `job_id` with `workers` and every tuning left to the spec and defaults.
    pub fn new(job_id: JobId, workers: usize) -> Self {
        JobOptions {
            job_id,
            workers,
            target_task_bytes: None,
            partitions: None,
            max_task_attempts: None,
        }
    }
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
    /// The job ended (any way): its record, for the report page.
    Finished(Box<record::RunRecord>),
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
    /// Every `[[check]]` and its verdict (failed warnings included).
    #[serde(default)]
    pub checks: Vec<CheckResult>,
    /// Rows set aside in the rejects table by quarantining checks.
    #[serde(default)]
    pub rejected_rows: u64,
    /// The rejects table's snapshot holding them.
    #[serde(default)]
    pub rejects_snapshot_id: Option<i64>,
}

impl JobReport {
    /// The rows, files and bytes the earlier run that committed this job added, from its
    /// snapshot's `summary`: a run that finds its job committed does nothing, and reports
    /// what that commit put in the table (a run resumed after its coordinator died mid-commit
    /// reported 0 rows although the rows were there).
    pub fn counts_of_earlier_commit(&mut self, summary: &HashMap<String, String>) {
        use nightshift_core::table::commit::summary_count;
        self.rows = summary_count(summary, "added-records");
        self.files = summary_count(summary, "added-data-files") as usize;
        self.bytes = summary_count(summary, "added-files-size");
    }
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
    /// A `[[check]]` of error severity failed; nothing was committed.
    #[error("{}", checks::describe_failures(&checks::blocking(.0)))]
    ChecksFailed(Vec<CheckResult>),
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

/// `e`, with a note where it is an error in the SQL and a parameter's value holds a quote:
/// `${name}` is pasted into the SQL as text, so `O'Brien` inside `'${owner}'` ends the
/// string early, and the parser's line and column are of the SQL after substitution.
fn with_quoted_params_noted(
    e: CoreError,
    params: &std::collections::BTreeMap<String, String>,
) -> CoreError {
    match e {
        CoreError::Sql(message) => match quoted_params_note(params) {
            Some(note) => CoreError::Sql(format!("{message} ({note})")),
            None => CoreError::Sql(message),
        },
        other => other,
    }
}

/// The note [`with_quoted_params_noted`] adds, if any parameter's value holds a quote.
fn quoted_params_note(params: &std::collections::BTreeMap<String, String>) -> Option<String> {
    let quoted: Vec<String> = params
        .iter()
        .filter(|(_, value)| value.contains(['\'', '"']))
        .map(|(name, value)| {
            let shown = nightshift_core::redact::redact(value);
            format!("{name} = `{shown}`")
        })
        .collect();
    if quoted.is_empty() {
        return None;
    }
    Some(format!(
        "parameters are pasted into the SQL as text before it is read, and {} holds a quote: inside '...' write a quote twice (--param \"owner=O''Brien\"); the line and column above are of the SQL after substitution",
        quoted.join(", ")
    ))
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
                JobError::ChecksFailed(_) => "checks_failed",
            },
            "error": redact(&error.to_string()),
            "checks": match error {
                JobError::ChecksFailed(results) => serde_json::to_value(results).unwrap_or_default(),
                _ => serde_json::json!([]),
            },
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
    /// What the run would change in the existing table's schema (`schema_evolution`).
    pub schema_changes: Vec<String>,
}

/// Everything a job needs before its first task: a session with the sources, and the plan.
struct Planned {
    plan: JobPlan,
    sources: Vec<SourceSummary>,
    partitions: usize,
    /// For a merge or a compaction: what of the table it read.
    merge: MergeRead,
    /// For a compaction: what it must write.
    compaction: Option<CompactionInput>,
    /// The session the sources are registered in (the checks on sources run their queries
    /// from it, on the workers).
    session: SessionContext,
}

/// What a merge read of its table: the snapshot (`Some(None)`: the table had none; `None`:
/// not a merge) and the data files of it that it rewrites (`None`: none to keep apart).
#[derive(Debug, Default)]
pub(crate) struct MergeRead {
    pub base: Option<Option<i64>>,
    pub files: Option<std::collections::HashSet<String>>,
}

/// What a compaction job rewrites, besides the files and snapshot in its [`MergeRead`].
#[derive(Debug, Clone)]
pub(crate) struct CompactionInput {
    /// The rows the rewritten files hold, by their manifests: the job writes exactly these.
    pub rows: u64,
    /// The size the written files aim for.
    pub target_file_bytes: u64,
    /// Per partition, the jobs whose rows its rewritten files hold: the footers of the
    /// files written ([`nightshift_core::table::provenance`]).
    pub footers: String,
}

/// Whether planning may read data: to run the checks on sources and to find a merge's key
/// ranges (a job), or not (`validate`, admission: those are only planned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlanReads {
    Data,
    Nothing,
}

async fn plan(
    spec: &ResolvedSpec,
    options: &JobOptions,
    catalog: Option<&dyn iceberg::Catalog>,
    (mode, reads): (PlanMode, PlanReads),
) -> Result<Planned, JobError> {
    let session = new_session(SessionOptions::default());
    if let Some(memory) = mode.broadcast_memory() {
        set_broadcast_threshold(&session, broadcast_threshold_for(memory))?;
    }
    let prepared = prepare(session, spec, options, catalog, reads).await?;
    let plan_options = PlanOptions {
        mode,
        partition_by: spec.partition_by.clone(),
    };
    let plan = plan_job(
        &prepared.session,
        &options.job_id,
        &prepared.sql,
        &plan_options,
    )
    .await
    .map_err(|e| with_quoted_params_noted(e, &spec.params))?;
    check_against_result(spec, &plan.output_schema, &prepared.session, catalog).await?;
    Ok(Planned {
        plan,
        sources: prepared.sources,
        partitions: prepared.partitions,
        merge: prepared.merge,
        compaction: prepared.compaction,
        session: prepared.session,
    })
}

/// A session with the spec's sources registered and sized, and the query the job runs.
/// A job plans in a session of its own ([`new_session`]: its Parquet scans cache their
/// files' metadata for the job's tasks); admission checks in a [`checking_session`].
struct Prepared {
    session: SessionContext,
    sources: Vec<SourceSummary>,
    partitions: usize,
    sql: String,
    merge: MergeRead,
    compaction: Option<CompactionInput>,
}

async fn prepare(
    session: SessionContext,
    spec: &ResolvedSpec,
    options: &JobOptions,
    catalog: Option<&dyn iceberg::Catalog>,
    reads: PlanReads,
) -> Result<Prepared, JobError> {
    let (sources, compaction, compaction_read) = match (spec.spec.target.mode, catalog) {
        (WriteMode::Compact, Some(catalog)) => {
            let (source, (input, read)) = compaction_input(&session, spec, catalog).await?;
            (vec![source], Some(input), Some(read))
        }
        _ => (register_sources(&session, spec, catalog).await?, None, None),
    };
    let partitions = choose_partitions(spec, options, &sources);
    set_partitions(&session, partitions);
    if let Some(bytes) = spec.spec.execution.broadcast_join_threshold_bytes {
        set_broadcast_threshold(&session, bytes)?;
    }
    let (sql, merge) = match spec.spec.target.mode {
        WriteMode::Merge => merge_sql_of(&session, spec, catalog, reads).await?,
        _ => (spec.sql.clone(), compaction_read.unwrap_or_default()),
    };
    Ok(Prepared {
        session,
        sources,
        partitions,
        sql,
        merge,
        compaction,
    })
}

/// The `[[check]]`s against the job's result columns and its sources: spec errors found
/// before any task runs.
async fn check_against_result(
    spec: &ResolvedSpec,
    output_schema: &SchemaRef,
    session: &SessionContext,
    catalog: Option<&dyn iceberg::Catalog>,
) -> Result<(), JobError> {
    // A check naming a column the result lacks.
    RowCheckCounter::new(
        &checks::row_checks(&spec.spec.check, output_schema)?,
        output_schema,
    )?;
    // A `unique` or `sql` check whose query does not run: tried on no rows.
    checks::run_set_checks(&spec.spec.check, &[], output_schema, catalog).await?;
    // Checks on sources are planned here (a missing column is a spec error); a job runs
    // them on its workers before its first task (`set_checks`).
    checks::run_source_checks(session, &spec.spec.check, catalog, false).await?;
    Ok(())
}

/// For `mode = "compact"`: registers the files the `[maintenance]` policy rewrites as the
/// one source, and what the job must write and commit.
async fn compaction_input(
    session: &SessionContext,
    spec: &ResolvedSpec,
    catalog: &dyn iceberg::Catalog,
) -> Result<(SourceSummary, (CompactionInput, MergeRead)), JobError> {
    let [source] = spec.spec.source.as_slice() else {
        return Err(JobError::Invalid(CoreError::Target {
            table: spec.spec.target.table.clone(),
            message: "mode = \"compact\" reads one source, the target itself".into(),
        }));
    };
    let policy = nightshift_core::table::compact::CompactPolicy {
        target_file_bytes: spec.spec.maintenance.target_file_size_bytes,
        min_input_files: spec.spec.maintenance.min_input_files.unwrap_or(2),
    };
    let (summary, chosen) =
        nightshift_core::sources::register_compaction_input(session, source, catalog, policy)
            .await?;
    tracing::info!(
        partitions = chosen.report.partitions,
        files = chosen.report.files_rewritten,
        bytes = chosen.report.bytes_rewritten,
        skipped_with_deletes = chosen.report.skipped_with_deletes,
        "compaction rewrites these small files"
    );
    let input = CompactionInput {
        rows: chosen.rows(),
        target_file_bytes: chosen.target_file_bytes,
        footers: nightshift_core::table::provenance::footers_of_groups(&chosen.groups).await?,
    };
    let read = MergeRead {
        base: Some(chosen.read_at),
        files: Some(chosen.replaced()),
    };
    Ok((summary, (input, read)))
}

/// The SQL a merge runs (see [`nightshift_core::merge`]), and the snapshot it reads the
/// table's current rows from (its commit must build on it).
async fn merge_sql_of(
    session: &SessionContext,
    spec: &ResolvedSpec,
    catalog: Option<&dyn iceberg::Catalog>,
    reads: PlanReads,
) -> Result<(String, MergeRead), JobError> {
    let target = &spec.spec.target;
    let result = nightshift_core::planner::spec_query(session, &spec.sql)
        .await
        .map_err(|e| JobError::Invalid(CoreError::Sql(e.to_string())))?;
    if let Some(part) = nightshift_core::merge::nondeterministic_part(result.logical_plan()) {
        return Err(JobError::Invalid(CoreError::Target {
            table: target.table.clone(),
            message: format!(
                "a merge evaluates its SQL more than once, so the SQL must give the same rows each time; {part} can give other rows each time (keys would be lost or doubled): select the changes with a WHERE, and pass times as ${{param}}s"
            ),
        }));
    }
    let typed_columns: Vec<(String, datafusion::arrow::datatypes::DataType)> = result
        .schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    let columns: Vec<String> = typed_columns.iter().map(|(c, _)| c.clone()).collect();
    if let Some(key) = target.merge_keys.iter().find(|k| !columns.contains(k)) {
        return Err(JobError::Invalid(CoreError::Target {
            table: target.table.clone(),
            message: format!(
                "merge key `{key}` is not a column of the result (columns: {})",
                columns.join(", ")
            ),
        }));
    }
    let target_read = match catalog {
        Some(catalog) => {
            let ranges = match reads {
                PlanReads::Data => {
                    change_key_ranges(session, &spec.sql, &target.merge_keys).await?
                }
                PlanReads::Nothing => None,
            };
            register_merge_target(
                session,
                &target.table,
                catalog,
                (&target.merge_keys, ranges.as_deref()),
            )
            .await?
        }
        None => None,
    };
    if let (Some(_), Some(catalog)) = (&target_read, catalog) {
        // The changes are compared with the table's rows key by key, so they must fit the
        // table's columns as an append's rows must; checked after the merge, a string
        // '007' was compared as text with the stored bigint 7 (and added beside it), and a
        // double 7.9 was stored as 7.
        let ident = parse_table_ident(&target.table)?;
        if let Some(existing) = load_if_exists(catalog, &ident).await? {
            check_target(spec, result.schema().inner(), Some(&existing))?;
        }
    }
    let target_columns = match target_read {
        Some(_) => Some(
            session
                .table(nightshift_core::merge::TARGET_VIEW)
                .await
                .map_err(|e| JobError::Internal(CoreError::Sql(e.to_string())))?
                .schema()
                .fields()
                .iter()
                .map(|f| (f.name().clone(), f.data_type().clone()))
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    let sql = nightshift_core::merge::merge_sql(
        &spec.sql,
        &typed_columns,
        &target.merge_keys,
        target.delete_when.as_deref(),
        target_columns.as_deref(),
    );
    Ok(match target_read {
        Some((base, files)) => (
            sql,
            MergeRead {
                base: Some(Some(base)),
                files: Some(files),
            },
        ),
        None => (
            sql,
            MergeRead {
                base: Some(None),
                files: None,
            },
        ),
    })
}

/// The smallest and largest value of each merge key among the changes (`None` when they
/// hold no key): which of the table's files a merge may have to rewrite.
async fn change_key_ranges(
    session: &SessionContext,
    changes_sql: &str,
    keys: &[String],
) -> Result<Option<Vec<nightshift_core::merge_files::KeyRange>>, JobError> {
    let quoted = |k: &String| format!("\"{}\"", k.replace('"', "\"\""));
    let bounds: Vec<String> = keys
        .iter()
        .map(|k| format!("MIN({q}), MAX({q})", q = quoted(k)))
        .collect();
    let query = format!(
        "SELECT {} FROM ({changes_sql}) __nightshift_changes",
        bounds.join(", ")
    );
    let sql_err =
        |e: datafusion::error::DataFusionError| JobError::Invalid(CoreError::Sql(e.to_string()));
    let batches = nightshift_core::planner::spec_query(session, &query)
        .await
        .map_err(sql_err)?
        .collect()
        .await
        .map_err(|e| JobError::Internal(CoreError::from(e)))?;
    let Some(row) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Ok(None);
    };
    let mut ranges = Vec::with_capacity(keys.len());
    for i in 0..keys.len() {
        let value = |column: usize| {
            datafusion::common::ScalarValue::try_from_array(row.column(column), 0)
                .map_err(|e| JobError::Internal(CoreError::from(e)))
        };
        let (min, max) = (value(2 * i)?, value(2 * i + 1)?);
        if min.is_null() || max.is_null() {
            return Ok(None);
        }
        ranges.push((min, max));
    }
    Ok(Some(ranges))
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

/// Join sides estimated below `bytes` are broadcast (the spec's setting, or by default
/// [`broadcast_threshold_for`] the memory of the tasks that will probe them).
fn set_broadcast_threshold(session: &SessionContext, bytes: u64) -> Result<(), JobError> {
    session
        .state_ref()
        .write()
        .config_mut()
        .options_mut()
        .set(BROADCAST_THRESHOLD_KEY, &bytes.to_string())
        .map_err(|e| JobError::Internal(e.into()))
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
    let catalog = match catalog {
        Some(config) => Some(open_catalog(config).await?),
        None => None,
    };
    let planned = plan(
        spec,
        options,
        catalog.as_deref(),
        (PlanMode::default(), PlanReads::Nothing),
    )
    .await?;
    let existing = match &catalog {
        Some(catalog) => {
            let ident = parse_table_ident(&spec.spec.target.table)?;
            load_if_exists(catalog.as_ref(), &ident).await?
        }
        None => None,
    };
    let schema_changes = check_target(spec, &planned.plan.output_schema, existing.as_ref())?;
    Ok(ValidationReport {
        sources: planned.sources,
        output_schema: planned.plan.output_schema.clone(),
        partitions: planned.partitions,
        plan: planned.plan,
        schema_changes,
    })
}

/// What the job API checks before it accepts a submission: [`validate_job`]'s checks as far
/// as the query's logical plan (sources found, contracts, the SQL's names and types, the
/// checks, the result against the target table), with `catalog` kept open across
/// submissions and the target looked up through `recent`. The physical plan and its stages
/// are made when the job runs: they cost a large part of a submission's time (see
/// `load-tests/README.md`), and an error only they find fails the job at its planning,
/// before any task runs, with the same message.
pub async fn check_submission(
    spec: &ResolvedSpec,
    catalog: &dyn iceberg::Catalog,
    recent: &RecentTables,
) -> Result<(), JobError> {
    let options = JobOptions::new(JobId::generate(), 1);
    let prepared = prepare(
        checking_session(),
        spec,
        &options,
        Some(catalog),
        PlanReads::Nothing,
    )
    .await?;
    let output_schema = output_schema(&prepared.session, &prepared.sql)
        .await
        .map_err(|e| with_quoted_params_noted(e, &spec.params))?;
    check_against_result(spec, &output_schema, &prepared.session, Some(catalog)).await?;
    let ident = parse_table_ident(&spec.spec.target.table)?;
    let existing = recent.existing(catalog, &ident).await?;
    check_target(spec, &output_schema, existing.as_ref())?;
    Ok(())
}

/// Whether a result of `output_schema` fits the target table (its partition spec, and the
/// `existing` table's schema); what it would change in that schema (`schema_evolution`).
fn check_target(
    spec: &ResolvedSpec,
    output_schema: &SchemaRef,
    existing: Option<&Table>,
) -> Result<Vec<String>, JobError> {
    let table = &spec.spec.target.table;
    if spec.spec.check.iter().any(|c| c.quarantines()) {
        // A result column the rejects table keeps for itself (`__check`, ...).
        nightshift_core::table::rejects_schema(output_schema, &format!("{table}__rejects"))?;
    }
    let Some(existing) = existing else {
        target_layout(table, output_schema, &spec.partition_by)?;
        return Ok(Vec::new());
    };
    let result = with_table_types_for_nulls(existing, output_schema)?;
    let (schema, _) = target_layout(table, &result, &spec.partition_by)?;
    let change = check_compatible(
        table,
        existing,
        &schema,
        &spec.partition_by,
        spec.spec.target.schema_evolution,
    )?;
    Ok(change.map(|c| c.changes).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sql_error_notes_the_parameters_whose_values_hold_a_quote() {
        let params = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let quoted = params(&[("owner", "O'Brien"), ("day", "2024-01-01")]);
        let noted = with_quoted_params_noted(CoreError::Sql("Unterminated string".into()), &quoted);
        let text = noted.to_string();
        assert!(
            text.starts_with("transform SQL: Unterminated string (parameters are pasted")
                && text.contains("owner = `O'Brien` holds a quote")
                && !text.contains("day ="),
            "{text}"
        );
        // No quote in any value, or another kind of error: as it was.
        let plain = params(&[("day", "2024-01-01")]);
        let text = with_quoted_params_noted(CoreError::Sql("x".into()), &plain).to_string();
        assert_eq!(text, "transform SQL: x");
        let other = CoreError::Transport("y".into());
        assert!(
            !with_quoted_params_noted(other, &quoted)
                .to_string()
                .contains("pasted")
        );
        // A value holding a password is shown redacted.
        let secret = params(&[("url", "postgres://u:pa'ss@h/db")]);
        let text = quoted_params_note(&secret).unwrap();
        assert!(!text.contains("pa'ss"), "{text}");
    }
}
