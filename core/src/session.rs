//! The DataFusion session every planner and worker uses: Ballista's restricted settings with
//! hash joins back on, Nightshift's join strategy rule, UDFs and sizing, and the runtime a
//! process executes tasks in (a bounded, spilling memory pool and a spill directory).
//! Coordinator and workers build it the same way, so a stage plan decodes identically on
//! both sides.

use std::any::Any;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use ballista_core::extension::SessionConfigExt;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::catalog::{CatalogProviderList, MemoryCatalogProviderList};
use datafusion::common::config::ConfigExtension;
use datafusion::common::{DataFusionError, ScalarValue, exec_err, extensions_options};
use datafusion::execution::SessionStateDefaults;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    FairSpillPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation, TrackConsumersPool,
};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;

use crate::joins::DistributedJoins;
use crate::storage::NightshiftStoreRegistry;
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::prelude::{SessionConfig, SessionContext};

/// Name of the UDF that enforces `not null` in a source's schema contract.
pub const REQUIRE_NOT_NULL_UDF: &str = "nightshift_require_not_null";

/// The least broadcast threshold [`broadcast_threshold_for`] gives (the fixed threshold
/// before it followed memory).
pub const MIN_BROADCAST_THRESHOLD_BYTES: u64 = 32 << 20;

/// The most it gives, however much memory there is: a broadcast side is read whole by the
/// first task of its stage on every worker before any probe row moves.
pub const MAX_BROADCAST_THRESHOLD_BYTES: u64 = 512 << 20;

/// A join side whose estimated size (Parquet statistics) is below this is broadcast instead
/// of shuffled with the other side: an eighth of the `memory` the table may count on (a
/// task's on workers, all tasks' in one process: `PlanMode::broadcast_memory`), between
/// [`MIN_BROADCAST_THRESHOLD_BYTES`] and [`MAX_BROADCAST_THRESHOLD_BYTES`].
/// `[execution] broadcast_join_threshold_bytes` overrides it; 0 turns broadcasts off.
///
/// Why an eighth: the table holds the side's rows and an index of them (an array of 4 bytes
/// per key value, or a hash table of 23–43 bytes per row), two to three times the estimate
/// for narrow rows, and a side with strings is only estimated (`joins`). A worker builds the
/// table once per stage, not per task (`shared_builds`), and the embedded mode once per
/// run, so it is held once beside the tasks' other operators. What it saves: the probe
/// side, usually the fact table, is not shuffled at all.
pub fn broadcast_threshold_for(memory: u64) -> u64 {
    (memory / 8).clamp(MIN_BROADCAST_THRESHOLD_BYTES, MAX_BROADCAST_THRESHOLD_BYTES)
}

/// A hash join on one integer key looks its build rows up in an array indexed by the key
/// (DataFusion's "perfect hash join", `ArrayMap`) when the build side's keys fill more than
/// this share of their range (DataFusion's default: 0.15). The array costs 4 bytes per value
/// of the range plus 4 per row: at 0.1, at most 44 bytes per row. The hash table it replaces
/// costs 23–43 bytes per row (a 17-byte bucket, at most 7/8 full and rounded up to a power
/// of two, plus a 4-byte chain link), so from here the array holds about as much memory or
/// less. Its lookup is one load where the table's is a hash, a probe of the table and a
/// comparison with the build row; and keys that arrive in order (a fact table sorted by its
/// key, such as lineitem by order) read the array in order, where hashing scatters them.
/// TPC-H's order keys fill a quarter of their range, an eighth in each of two partitions:
/// the order join of an embedded run (two tasks) takes the array from this value, not from
/// DataFusion's.
pub const ARRAY_JOIN_MIN_KEY_DENSITY: f64 = 0.1;

/// Ballista's key for the broadcast threshold. A spec's `broadcast_join_threshold_bytes` is
/// stored here; the planner hands it to DataFusion's join selection and turns Ballista's own
/// promotion off (it broadcasts outer joins whose unmatched build rows would repeat per task).
pub const BROADCAST_THRESHOLD_KEY: &str = "ballista.optimizer.broadcast_join_threshold_bytes";

extensions_options! {
    /// Nightshift's settings inside a DataFusion session (`nightshift.*`).
    pub struct NightshiftOptions {
        /// Every task of the job runs in this process on one shared plan, so operators that
        /// coordinate their partitions in memory (a broadcast outer join's unmatched rows)
        /// are correct as DataFusion runs them.
        pub single_process: bool, default = false
        /// Memory one task may count on, in bytes (0: unknown). A shuffled hash join whose
        /// build side would not fit is planned as a sort-merge join, which spills.
        pub task_memory_bytes: usize, default = 0
    }
}

impl ConfigExtension for NightshiftOptions {
    const PREFIX: &'static str = "nightshift";
}

/// Sizing of a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Partitions of scans and shuffles: the number of tasks per stage.
    pub partitions: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// The runtime tasks execute in (memory pool, spill directory, object stores). `None`
    /// builds one with the default memory limit, for sessions that only plan.
    pub runtime: Option<Arc<RuntimeEnv>>,
    /// Memory one task may count on; `None` derives it from the machine.
    pub task_memory: Option<u64>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            partitions: 4,
            batch_size: 8192,
            runtime: None,
            task_memory: None,
        }
    }
}

/// Builds the session used to plan (coordinator) and to decode and run stage plans (worker).
pub fn new_session(options: SessionOptions) -> SessionContext {
    let task_memory = options
        .task_memory
        .unwrap_or_else(|| MemorySettings::new(None, None, 1).limit);
    let threshold = broadcast_threshold_for(task_memory);
    let config = SessionConfig::new_with_ballista()
        .with_target_partitions(options.partitions.max(1))
        .with_batch_size(options.batch_size)
        .with_information_schema(false)
        // Split scans of any size into `partitions` byte ranges: task size is set by the
        // caller through `partitions`, not by DataFusion's 10 MiB floor.
        .set_usize("datafusion.optimizer.repartition_file_min_size", 0)
        .set_bool("datafusion.execution.collect_statistics", true)
        // Ballista turns hash joins off because they do not spill. Nightshift keeps them and
        // bounds them instead: a build side too large for a task's memory becomes a
        // sort-merge join (`joins::DistributedJoins`), and the memory pool fails a task that
        // still does not fit with the operator's name and the limit.
        .set_bool("datafusion.optimizer.prefer_hash_join", true)
        .set_u64(BROADCAST_THRESHOLD_KEY, threshold)
        // A sort reserves this much up front to merge its spill files; under a small limit
        // (several tasks sharing a few hundred MiB) the fixed 10 MiB would fail the task.
        .set_u64(
            "datafusion.execution.sort_spill_reservation_bytes",
            (task_memory / 8).clamp(256 << 10, 10 << 20),
        )
        .with_option_extension(NightshiftOptions {
            single_process: false,
            task_memory_bytes: task_memory as usize,
        });
    // The tasks of a stage that run in this session share its broadcast joins' tables.
    let config = config.with_extension(Arc::new(crate::shared_builds::SharedBuilds::default()));
    let mut config = with_broadcast_threshold(config, threshold);
    config
        .options_mut()
        .execution
        .perfect_hash_join_min_key_density = ARRAY_JOIN_MIN_KEY_DENSITY;
    let runtime = options.runtime.unwrap_or_else(|| {
        RuntimeEnvBuilder::new()
            .with_object_store_registry(Arc::new(NightshiftStoreRegistry))
            .build_arc()
            .expect("runtime environment")
    });
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_physical_optimizer_rules(physical_optimizer_rules())
        .build();
    let ctx = SessionContext::new_with_state(state);
    crate::bounded_functions::register(&ctx);
    crate::checked_integers::register(&ctx);
    ctx.register_udf(ScalarUDF::new_from_impl(RequireNotNull::new()));
    ctx.register_udf(ScalarUDF::new_from_impl(
        crate::merge::RequireUniqueKey::default(),
    ));
    ctx
}

/// A session to check a query in, as far as its logical plan (names and types: the job
/// API's admission), as [`new_session`] builds by default but cloned from one built once per
/// process: building one registers every DataFusion function anew, a large part of
/// admitting a submission. Its tables are its own (a fresh catalog), and its runtime caches
/// no listing or file metadata, so a check always sees the files a source has now:
/// DataFusion 53 would otherwise keep a directory's listing for the life of the runtime.
/// Not for plans that run: a Parquet scan planned here would read its files' metadata
/// anew in every task, where a session of its own caches it for the job.
pub fn checking_session() -> SessionContext {
    static TEMPLATE: OnceLock<SessionState> = OnceLock::new();
    let template = TEMPLATE.get_or_init(|| {
        let caches = CacheManagerConfig::default()
            .with_list_files_cache_limit(0)
            .with_metadata_cache_limit(0);
        let runtime = RuntimeEnvBuilder::new()
            .with_object_store_registry(Arc::new(NightshiftStoreRegistry))
            .with_cache_manager(caches)
            .build_arc()
            .expect("runtime environment");
        new_session(SessionOptions {
            runtime: Some(runtime),
            ..SessionOptions::default()
        })
        .state()
    });
    let catalog = SessionStateDefaults::default_catalog(
        template.config(),
        template.table_factories(),
        template.runtime_env(),
    );
    let catalogs = MemoryCatalogProviderList::new();
    catalogs.register_catalog(
        template.config().options().catalog.default_catalog.clone(),
        Arc::new(catalog),
    );
    let ctx = SessionContext::new_with_state(template.clone());
    ctx.register_catalog_list(Arc::new(catalogs));
    ctx
}

/// Sets DataFusion's join selection to broadcast (collect) a join side below `bytes`.
pub fn with_broadcast_threshold(config: SessionConfig, bytes: u64) -> SessionConfig {
    // Without byte statistics (CSV), rows stand in, at a conservative 64 bytes per row.
    config
        .set_u64(
            "datafusion.optimizer.hash_join_single_partition_threshold",
            bytes,
        )
        .set_u64(
            "datafusion.optimizer.hash_join_single_partition_threshold_rows",
            bytes / 64,
        )
}

/// DataFusion's physical optimizer rules with Nightshift's join strategy right after join
/// selection, before distribution and sorting are enforced around the joins it chose.
fn physical_optimizer_rules()
-> Vec<Arc<dyn datafusion::physical_optimizer::PhysicalOptimizerRule + Send + Sync>> {
    let mut rules = PhysicalOptimizer::new().rules;
    let at = rules
        .iter()
        .position(|r| r.name() == "join_selection")
        .map_or(0, |i| i + 1);
    rules.insert(at, Arc::new(DistributedJoins));
    // After distribution and sorting are enforced (the sort it goes below is in place), and
    // before the sanity check.
    let at = rules
        .iter()
        .position(|r| r.name() == "SanityCheckPlan")
        .unwrap_or(rules.len());
    rules.insert(at, Arc::new(crate::window_topk::WindowTopK));
    rules
}

/// Input rows after which a partial aggregate of the single-process mode judges whether it
/// pays (DataFusion judges after 100 k): a sample of 100 k rows counts most groups of a
/// table of tens of thousands (a day and a nation: 63 k groups over millions of rows) as
/// new, and would skip an aggregate that reduces the rows a hundredfold.
pub const SINGLE_PROCESS_PARTIAL_AGGREGATE_PROBE_ROWS: usize = 1_000_000;

/// A partial aggregate of the single-process mode that has seen at least this many groups
/// per input row after [`SINGLE_PROCESS_PARTIAL_AGGREGATE_PROBE_ROWS`] stops aggregating and
/// passes its rows on (DataFusion's default: 0.8). In one process the exchange after it is
/// an in-memory repartition, not a shuffle through storage, so a partial aggregate pays only
/// where it shrinks the rows about tenfold; short of that, its table (as large as the
/// final one: `GROUP BY l_orderkey` keeps 7.5 M groups per task) costs a second cache miss
/// per row and the memory that makes the final aggregate spill.
pub const SINGLE_PROCESS_PARTIAL_AGGREGATE_SKIP_RATIO: f64 = 0.1;

/// The settings a task of the single-process mode runs with: `config` with the partial
/// aggregates' skip rule of that mode (above). The cluster's, and the embedded staged
/// mode's, keep DataFusion's: their partial aggregates shrink what goes through the shuffle.
pub fn single_process_config(config: &SessionConfig) -> SessionConfig {
    let mut config = config.clone();
    let execution = &mut config.options_mut().execution;
    execution.skip_partial_aggregation_probe_rows_threshold =
        SINGLE_PROCESS_PARTIAL_AGGREGATE_PROBE_ROWS;
    execution.skip_partial_aggregation_probe_ratio_threshold =
        SINGLE_PROCESS_PARTIAL_AGGREGATE_SKIP_RATIO;
    config
}

/// Memory of one process that runs tasks (a worker, or an embedded run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySettings {
    /// Bytes all of the process's running tasks may hold in operators (hash tables, sort
    /// buffers, aggregation state); beyond it operators spill, or the task fails.
    pub limit: u64,
    /// Where operators spill; `None` is the system's temporary directory.
    pub spill_dir: Option<PathBuf>,
    /// Tasks running at once, which share `limit`.
    pub concurrent_tasks: usize,
}

impl MemorySettings {
    /// `limit`, or by default 60 % of the memory this process may use (its cgroup's limit, or
    /// the machine's memory): the rest is for what the pool does not count (I/O buffers,
    /// Parquet writers, the allocator's slack).
    pub fn new(limit: Option<u64>, spill_dir: Option<PathBuf>, concurrent_tasks: usize) -> Self {
        MemorySettings {
            limit: limit.unwrap_or_else(|| available_memory() / 10 * 6),
            spill_dir,
            concurrent_tasks: concurrent_tasks.max(1),
        }
    }

    /// What one task may count on when every running task holds as much.
    pub fn per_task(&self) -> u64 {
        self.limit / self.concurrent_tasks as u64
    }

    /// The runtime tasks execute in: a fair spilling pool of `limit` that names the largest
    /// consumers when it refuses memory, and a disk manager on `spill_dir`.
    pub fn runtime(&self) -> crate::Result<Arc<RuntimeEnv>> {
        let pool = BoundedPool {
            inner: TrackConsumersPool::new(
                FairSpillPool::new(self.limit as usize),
                NonZeroUsize::new(3).expect("non-zero"),
            ),
            settings: self.clone(),
        };
        let mode = match &self.spill_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    crate::CoreError::io(format!("create spill directory {}", dir.display()), e)
                })?;
                DiskManagerMode::Directories(vec![dir.clone()])
            }
            None => DiskManagerMode::OsTmpDirectory,
        };
        Ok(RuntimeEnvBuilder::new()
            .with_object_store_registry(Arc::new(NightshiftStoreRegistry))
            .with_memory_pool(Arc::new(pool))
            .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(mode))
            .build_arc()?)
    }
}

/// Memory this process may use: the cgroup's limit (v2, then v1) if set, else the machine's.
pub fn available_memory() -> u64 {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&v| v > 0 && v < (1 << 60));
    let machine = read("/proc/meminfo").and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    match (cgroup, machine) {
        (Some(c), Some(m)) => c.min(m),
        (Some(c), None) => c,
        (None, Some(m)) => m,
        (None, None) => 4 << 30,
    }
}

/// Parses a byte size: `2147483648`, `512MiB`, `2GiB`, `2G`, `1.5g` (powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 2GiB, 512MiB or 1073741824"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` in `{text}`")),
    };
    Ok((number * scale as f64) as u64)
}

/// Bytes for people: `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The process's memory pool: DataFusion's fair spilling pool, whose refusals say which
/// operator asked, how much the limit is and how to raise it.
#[derive(Debug)]
struct BoundedPool {
    inner: TrackConsumersPool<FairSpillPool>,
    settings: MemorySettings,
}

impl MemoryPool for BoundedPool {
    fn register(&self, consumer: &MemoryConsumer) {
        self.inner.register(consumer)
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.inner.unregister(consumer)
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.inner.grow(reservation, additional)
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.inner.shrink(reservation, shrink)
    }

    fn try_grow(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
    ) -> datafusion::error::Result<()> {
        self.inner
            .try_grow(reservation, additional)
            .map_err(|e| match e {
                DataFusionError::ResourcesExhausted(detail) => {
                    DataFusionError::ResourcesExhausted(format!(
                        "operator {} needs more memory than the memory limit of {} ({} task(s) at once{}) allows; raise --memory-limit or [worker] memory_limit. {detail}",
                        reservation.consumer().name(),
                        human_bytes(self.settings.limit),
                        self.settings.concurrent_tasks,
                        if reservation.consumer().can_spill() {
                            ", after spilling"
                        } else {
                            ", and it cannot spill"
                        },
                    ))
                }
                other => other,
            })
    }

    fn reserved(&self) -> usize {
        self.inner.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.settings.limit as usize)
    }
}

/// `nightshift_require_not_null(value, 'message')` returns `value`, or fails the task with
/// `message` if `value` holds a null. Used for `not null` columns of schema contracts.
#[derive(Debug, PartialEq, Eq, Hash)]
struct RequireNotNull {
    signature: Signature,
}

impl RequireNotNull {
    fn new() -> Self {
        RequireNotNull {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for RequireNotNull {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        REQUIRE_NOT_NULL_UDF
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(arg_types[0].clone())
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> datafusion::error::Result<FieldRef> {
        let input = &args.arg_fields[0];
        Ok(Arc::new(Field::new(
            input.name(),
            input.data_type().clone(),
            false,
        )))
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let message = match &args.args[1] {
            ColumnarValue::Scalar(ScalarValue::Utf8(Some(m))) => m.clone(),
            _ => return exec_err!("{REQUIRE_NOT_NULL_UDF} needs a string literal message"),
        };
        let nulls = match &args.args[0] {
            ColumnarValue::Array(array) => array.null_count(),
            ColumnarValue::Scalar(s) => usize::from(s.is_null()) * args.number_rows,
        };
        if nulls > 0 {
            return Err(DataFusionError::Execution(format!(
                "{message}: found {nulls} null value(s) in a batch of {} row(s)",
                args.number_rows
            )));
        }
        Ok(args.args[0].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broadcast_may_take_an_eighth_of_a_task_between_32_and_512_mib() {
        assert_eq!(broadcast_threshold_for(2 << 30), 256 << 20);
        assert_eq!(broadcast_threshold_for(1 << 30), 128 << 20);
        // Small tasks keep the fixed default they had; large ones stop at the ceiling.
        assert_eq!(broadcast_threshold_for(64 << 20), 32 << 20);
        assert_eq!(broadcast_threshold_for(0), 32 << 20);
        assert_eq!(broadcast_threshold_for(64 << 30), 512 << 20);
    }

    #[test]
    fn sizes_parse_in_powers_of_1024() {
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512m"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("2 parsecs").is_err());
    }

    #[tokio::test]
    async fn checking_sessions_share_functions_but_not_tables_or_listings() {
        let dir = tempfile::tempdir().unwrap();
        let csv = |name: &str| {
            std::fs::write(dir.path().join(name), "a,b\n1,x\n2,y\n").unwrap();
        };
        csv("one.csv");
        let location = format!("{}/", dir.path().display());
        let count = |ctx: SessionContext| {
            let location = location.clone();
            async move {
                ctx.register_csv("t", &location, Default::default())
                    .await
                    .unwrap();
                let rows = ctx
                    .sql("SELECT count(*) FROM t WHERE nightshift_require_not_null(a, 'a') > 0")
                    .await
                    .unwrap()
                    .collect()
                    .await
                    .unwrap();
                let counted = rows[0].column(0).as_any();
                let counted = counted
                    .downcast_ref::<datafusion::arrow::array::Int64Array>()
                    .unwrap();
                counted.value(0)
            }
        };
        // Each session registers `t` of its own (a shared catalog would refuse the second),
        // and sees Nightshift's functions.
        assert_eq!(count(checking_session()).await, 2);
        // A file that arrives later is listed by the next session.
        csv("two.csv");
        assert_eq!(count(checking_session()).await, 4);
    }

    #[test]
    fn default_limit_leaves_room_outside_the_pool() {
        let settings = MemorySettings::new(None, None, 2);
        assert!(settings.limit > 0 && settings.limit < available_memory());
        assert_eq!(settings.per_task(), settings.limit / 2);
    }
}

#[cfg(test)]
mod memory_tests {
    use datafusion::physical_plan::metrics::MetricsSet;
    use datafusion::physical_plan::{ExecutionPlan, collect};

    use super::*;

    /// `metric` summed over every operator of an executed plan.
    fn plan_total(
        plan: &Arc<dyn ExecutionPlan>,
        metric: &dyn Fn(&MetricsSet) -> Option<usize>,
    ) -> usize {
        plan.metrics().and_then(|m| metric(&m)).unwrap_or(0)
            + plan
                .children()
                .into_iter()
                .map(|child| plan_total(child, metric))
                .sum::<usize>()
    }

    /// Spills counted by every operator of an executed plan.
    fn spills(plan: &Arc<dyn ExecutionPlan>) -> usize {
        plan_total(plan, &|m| m.spill_count())
    }

    /// The rows of `sql` as a table, and the executed plan (its metrics filled in).
    async fn run_plan(
        ctx: &SessionContext,
        sql: &str,
    ) -> datafusion::error::Result<(String, Arc<dyn ExecutionPlan>)> {
        let plan = ctx.sql(sql).await?.create_physical_plan().await?;
        let batches = collect(plan.clone(), ctx.task_ctx()).await?;
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)?.to_string();
        Ok((text, plan))
    }

    async fn run(ctx: &SessionContext, sql: &str) -> datafusion::error::Result<(String, usize)> {
        let (text, plan) = run_plan(ctx, sql).await?;
        Ok((text, spills(&plan)))
    }

    fn session(limit: Option<u64>, dir: &std::path::Path) -> SessionContext {
        let runtime = limit.map(|limit| {
            MemorySettings::new(Some(limit), Some(dir.to_path_buf()), 1)
                .runtime()
                .unwrap()
        });
        new_session(SessionOptions {
            partitions: 2,
            runtime,
            ..SessionOptions::default()
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_limit_spills_and_gives_the_rows_of_an_unlimited_run() {
        let dir = tempfile::tempdir().unwrap();
        let sql = "SELECT v % 300007 AS g, count(*) AS c, sum(v) AS s \
                   FROM generate_series(1, 600000) AS t(v) GROUP BY 1 ORDER BY 1 DESC LIMIT 20 OFFSET 1000";
        let (unlimited, unlimited_spills) = run(&session(None, dir.path()), sql).await.unwrap();
        let (limited, limited_spills) = run(&session(Some(20 << 20), dir.path()), sql)
            .await
            .unwrap();
        assert_eq!(unlimited_spills, 0);
        assert!(limited_spills > 0, "nothing spilled under 20 MiB");
        assert_eq!(limited, unlimited);
    }

    /// Hash tables a plan's joins replaced with an array indexed by the key.
    fn array_joins(plan: &Arc<dyn ExecutionPlan>) -> usize {
        plan_total(plan, &|m| {
            m.sum_by_name("array_map_created_count")
                .map(|v| v.as_usize())
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_filling_an_eighth_of_their_range_join_through_an_array() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = session(None, dir.path());
        // Keys 4, 8, 12, ... on both sides: a quarter of their range, an eighth in each of
        // the two partitions of the join (as TPC-H's order keys in an embedded run), 100 000
        // of them matching. DataFusion's default density (0.15) would build hash tables.
        let sql = "SELECT count(*) AS c, sum(k) AS s \
                   FROM (SELECT u * 4 AS k FROM generate_series(1, 400000) AS p(u)) AS p \
                   JOIN (SELECT v * 4 AS b FROM generate_series(1, 100000) AS t(v)) AS d ON k = b";
        let (text, plan) = run_plan(&ctx, sql).await.unwrap();
        assert!(text.contains("| 100000 | 20000200000 |"), "{text}");
        assert!(
            array_joins(&plan) > 0,
            "no join used an array: {}",
            datafusion::physical_plan::displayable(plan.as_ref()).indent(true)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_that_cannot_fit_names_the_operator_and_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let sql = "SELECT count(*) FROM generate_series(1, 2000000) AS a(x) \
                   JOIN generate_series(1, 2000000) AS b(y) ON x = y";
        let err = run(&session(Some(4 << 20), dir.path()), sql)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory limit of 4.0 MiB"), "{err}");
        assert!(err.contains("operator "), "{err}");
        assert!(err.contains("--memory-limit"), "{err}");
    }
}
