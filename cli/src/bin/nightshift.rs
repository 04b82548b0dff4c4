//! `nightshift`: run, validate and inspect nightly Iceberg pipelines.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nightshift::client;
use nightshift::cluster::DlqAction;
use nightshift::embedded::{EmbeddedOptions, embedded_catalog, prepare_warehouse, run_embedded};
use nightshift::output::{self, EXIT_FAILED, EXIT_INVALID};
use nightshift::progress::StageBars;
use nightshift_cluster::ClusterConfig;
use nightshift_coordinator::{JobError, JobEvent, JobOptions, validate_job};
use nightshift_core::ids::JobId;
use nightshift_core::redact::RedactingWriter;
use nightshift_core::session::MemorySettings;
use nightshift_proto::v1::ListJobsRequest;
use nightshift_spec::{ResolvedSpec, load_spec, parse_param_arg};

/// `print!` to stdout; when its reader has gone (`nightshift history t | head -1`), the
/// command ends quietly with exit code 0, as the reader asked for no more, instead of
/// panicking. (Restoring the default SIGPIPE would also end the process when a network
/// peer closes a connection it writes to.)
macro_rules! out {
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*))
    };
}

/// [`out!`] with a line break.
macro_rules! outln {
    () => {
        write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

fn write_stdout(text: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        panic!("cannot write to stdout: {e}");
    }
}

/// Nightly batch pipelines that publish Apache Iceberg tables.
///
/// A pipeline is a TOML spec plus SQL: sources to read, a transform, a target table. Each
/// run is a job that commits exactly one Iceberg snapshot, or nothing if anything fails.
///
/// Start with:
///   nightshift example-data examples/data
///   nightshift run examples/daily_revenue/pipeline.toml
#[derive(Parser)]
#[command(name = "nightshift", version, verbatim_doc_comment)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log lines for people (`human`) or one JSON object per line (`json`, for containers
    /// and log pipelines; span fields such as job_id, stage, task and attempt included).
    #[arg(long, global = true, value_enum, env = "NIGHTSHIFT_LOG_FORMAT", default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline on this machine (embedded mode: no servers needed).
    ///
    /// The result is committed to the Iceberg table named in [target] as one snapshot whose
    /// summary records the job id, the pipeline and its parameters. Running again with the
    /// same --job-id does nothing: the table's history shows the job is committed.
    ///
    /// Exit codes: 0 succeeded, 1 the job failed while running, 2 the spec, a source, the
    /// SQL or the target is invalid (nothing ran). Nothing is committed unless it exits 0.
    Run(RunArgs),
    /// Run a pipeline once per value of a parameter range, each value its own job and
    /// snapshot, in order: backfill a month after a bug fix, or rebuild history.
    ///
    ///   nightshift backfill pipeline.toml --param-range run_date=2024-01-01..2024-01-31
    ///
    /// Each value's job id is derived from the pipeline, the parameter and the value, so
    /// running the same backfill again skips the values already committed and resumes where
    /// a stopped or failed one ended. After a failure no further value starts. To redo
    /// values committed before (a backfill after a bug fix), give the backfill a new
    /// --run-id: its values get new job ids, and replace what the values committed before
    /// (so a redo needs mode "overwrite_partitions" or "merge"; an "append" target is
    /// refused). The target must add to the table: mode "append", "overwrite_partitions"
    /// (each value must own its partitions: a value replacing rows another value of the
    /// backfill committed fails) or "merge". Each value's outcome is printed on stderr as it
    /// ends, the table of all on stdout at the end. Exit codes as for run.
    ///
    ///   nightshift backfill pipeline.toml --param-range run_date=2024-01-01..2024-01-31 --run-id fix-1
    #[command(verbatim_doc_comment)]
    Backfill(BackfillArgs),
    /// Keep a table small and cheap: drop partitions past a retention period (one `delete`
    /// snapshot), compact small data files (per partition, into files near the target size,
    /// one `replace` snapshot; appends committed meanwhile are kept), expire old snapshots
    /// (and the files only they referenced) and remove orphan files (files no snapshot
    /// references, older than a safety age, e.g. left by a crashed writer). Runs in that
    /// order. Never deletes a file any snapshot references.
    ///
    ///   nightshift maintain analytics.daily_revenue --drop-partitions-older-than 400d
    ///   nightshift maintain analytics.daily_revenue --compact
    ///   nightshift maintain analytics.daily_revenue --expire-older-than 7d --keep-last 10
    ///   nightshift maintain analytics.daily_revenue --remove-orphans-older-than 3d --dry-run
    ///   nightshift maintain --spec pipeline.toml --cluster cluster.toml   # compaction on the workers
    #[command(verbatim_doc_comment)]
    Maintain(MaintainArgs),
    /// List a table's snapshots, newest first, with what made each: the job and pipeline,
    /// the code (a digest of the spec and SQL, the git commit), the parameters, the inputs
    /// (files and bytes read, the snapshot of each Iceberg source) and the checks.
    ///
    ///   nightshift history analytics.daily_revenue
    ///   nightshift history analytics.daily_revenue --cluster cluster.toml --output json
    #[command(verbatim_doc_comment)]
    History(HistoryArgs),
    /// Test a pipeline in CI on sample data: each source reads DIR/<source>.<format> (or the
    /// directory DIR/<source>/) instead of its location; the contracts are checked, the
    /// transform runs and every [[check]] is judged, in a throw-away warehouse. Exits 1 when
    /// a case of error severity fails (a sample that drifted from its contract, a broken
    /// rule), 2 when the spec itself is wrong.
    ///
    ///   nightshift check pipelines/orders.toml --sample tests/samples/orders
    ///   nightshift check pipelines/orders.toml --sample samples --junit reports/orders.xml
    #[command(verbatim_doc_comment)]
    Check(CheckArgs),
    /// Write a job's report as one HTML page to open in a browser: the plan's stages as a
    /// graph with rows, bytes and time per stage, the task timeline by worker, every check
    /// with samples of failing rows, inputs → output lineage and the snapshot. Works for
    /// failed jobs too. A cluster's coordinator serves the same page, at
    /// /jobs/<job>/report on its admin port (with its progress while the job runs).
    ///
    ///   nightshift report --last
    ///   nightshift report nightly-2024-05-01 --out reports/nightly.html
    ///   nightshift report nightly-2024-05-01 --cluster cluster.toml
    #[command(verbatim_doc_comment)]
    Report(ReportArgs),
    /// Check a pipeline without writing anything: parse the spec, find the sources, check
    /// their schema contracts, plan the SQL and print the stages and the output schema.
    Validate(CommonArgs),
    /// Run the coordinator of a cluster: takes job submissions from RabbitMQ, schedules their
    /// tasks on workers, commits each job as one Iceberg snapshot. Safe to restart mid-job.
    Coordinator {
        /// Cluster configuration (TOML; NIGHTSHIFT_* environment variables override it).
        #[arg(long, env = "NIGHTSHIFT_CONFIG")]
        config: PathBuf,
        /// Jobs run at once.
        #[arg(long, default_value_t = 4)]
        max_jobs: usize,
        /// Serve the gRPC job API (JobService, health, reflection) on this address.
        #[arg(long, env = "NIGHTSHIFT_LISTEN", value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// File with the API's bearer tokens, one per line (e.g. a mounted Kubernetes Secret):
        /// `TOKEN` (the shared namespace: such tokens see each other's jobs), `CLIENT TOKEN`
        /// (client CLIENT sees, lists and cancels only its own jobs; its idempotency keys are
        /// its own) or `CLIENT TOKEN operator` (sees and cancels every job). Blank lines and
        /// lines starting with `#` are not tokens. NIGHTSHIFT_API_TOKENS (entries separated
        /// by commas) also works.
        #[arg(long, value_name = "FILE")]
        tokens_file: Option<PathBuf>,
        /// Serve the API without authentication (local testing only).
        #[arg(long)]
        no_auth: bool,
        /// Serve the API over TLS with this certificate (PEM) and --tls-key.
        #[arg(long, requires = "tls_key", value_name = "PEM")]
        tls_cert: Option<PathBuf>,
        /// The TLS private key (PEM).
        #[arg(long, requires = "tls_cert", value_name = "PEM")]
        tls_key: Option<PathBuf>,
        /// Require client certificates signed by this CA (mutual TLS).
        #[arg(long, requires = "tls_cert", value_name = "PEM")]
        tls_client_ca: Option<PathBuf>,
        /// Serve /metrics (Prometheus), /healthz and /readyz on this address (port 0: any).
        #[arg(long, env = "NIGHTSHIFT_METRICS_LISTEN", value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Submit a pipeline to a coordinator's job API. Prints the job id; with --wait, follows
    /// the job and exits 0 succeeded, 1 failed, 2 rejected, 3 cancelled.
    Submit(SubmitArgs),
    /// Print a job's state.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        job_id: String,
    },
    /// Follow a job until it ends (exit codes as for submit --wait).
    Watch {
        #[command(flatten)]
        api: ApiArgs,
        job_id: String,
    },
    /// Cancel a job: its tasks stop, nothing is committed.
    Cancel {
        #[command(flatten)]
        api: ApiArgs,
        job_id: String,
    },
    /// List jobs, newest first.
    Jobs {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this pipeline's jobs.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only jobs in this state.
        #[arg(long, value_enum)]
        state: Option<client::StateFilter>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue a listing: the token the previous page printed.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Run a cluster worker: takes tasks from RabbitMQ, runs them, writes to object storage.
    /// Start as many as you like; stop or kill them at any time.
    Worker {
        #[arg(long, env = "NIGHTSHIFT_CONFIG")]
        config: PathBuf,
        /// Worker name in logs and task results (default: host name and process id).
        #[arg(long)]
        id: Option<String>,
        /// Serve /metrics (Prometheus), /healthz and /readyz on this address (port 0: any).
        #[arg(long, env = "NIGHTSHIFT_METRICS_LISTEN", value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// On SIGTERM, how long the running task may take to finish before it is handed
        /// back to the queue. Keep it below the pod's terminationGracePeriodSeconds.
        #[arg(long, env = "NIGHTSHIFT_DRAIN_GRACE_SECS", default_value_t = 25)]
        drain_grace_secs: u64,
    },
    /// Inspect and replay tasks the broker dead-lettered (a task every worker that took it
    /// died on, up to the queue's delivery limit).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Generate TPC-H example data (orders, lineitem, customer, nation, region).
    ExampleData {
        /// Directory to write into.
        dir: PathBuf,
        /// TPC-H scale factor: 0.01 is 15,000 orders and 60,000 line items.
        #[arg(long, default_value_t = 0.01)]
        scale: f64,
        /// Files per table for orders and lineitem.
        #[arg(long, default_value_t = 4)]
        parts: usize,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead-lettered tasks: job, stage, task, attempt, deliveries, why, and the job's
    /// state and last error.
    List {
        #[arg(long, env = "NIGHTSHIFT_CONFIG")]
        config: PathBuf,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move dead-lettered tasks back to the task queue with a fresh delivery count. Tasks of
    /// a job that has ended (it failed when its task was dead-lettered) stay: run that job
    /// again under its job id instead.
    Replay {
        #[command(flatten)]
        tasks: DeadTasksOf,
    },
    /// Remove dead-lettered tasks whose job has ended (succeeded on a rerun, failed or
    /// cancelled): nothing would run them, and they would stay listed. Tasks of jobs still
    /// queued or running, or unknown to Redis, stay (replay those).
    Purge {
        #[command(flatten)]
        tasks: DeadTasksOf,
    },
}

/// Which dead-lettered tasks `dlq replay` and `dlq purge` take: one job's, or every job's.
#[derive(Args)]
struct DeadTasksOf {
    #[arg(long, env = "NIGHTSHIFT_CONFIG")]
    config: PathBuf,
    /// The job whose tasks to take.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    job_id: Option<String>,
    /// Take the tasks of every job.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct CommonArgs {
    /// The pipeline spec (TOML).
    pipeline: PathBuf,
    /// Warehouse directory; the SQLite catalog is <warehouse>/catalog.db.
    #[arg(long, env = "NIGHTSHIFT_WAREHOUSE", default_value = "warehouse")]
    warehouse: PathBuf,
    /// Override a [params] value, e.g. --param run_date=2024-03-01. Repeatable.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param_arg)]
    params: Vec<(String, String)>,
    /// Input bytes per scan task (default 64 MiB; [execution] target_task_bytes).
    #[arg(long, value_name = "BYTES")]
    target_task_bytes: Option<u64>,
    /// Tasks per stage, overriding the size-based default.
    #[arg(long)]
    partitions: Option<usize>,
}

#[derive(Args)]
struct ApiArgs {
    /// The coordinator's job API (https:// for TLS). The bearer token comes from
    /// NIGHTSHIFT_TOKEN or the file named by NIGHTSHIFT_TOKEN_FILE; for TLS, the CA from
    /// NIGHTSHIFT_CA_CERT and, for mutual TLS, NIGHTSHIFT_CLIENT_CERT / NIGHTSHIFT_CLIENT_KEY.
    #[arg(
        long,
        env = "NIGHTSHIFT_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
}

#[derive(Args)]
struct SubmitArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The pipeline spec: a local TOML file (the SQL file it names is sent along), or a URL
    /// such as s3://lake/pipelines/daily.toml that the coordinator reads itself (it must lie
    /// under the coordinator's allowed locations, and its sources must be absolute URLs).
    pipeline: String,
    /// Override a [params] value, e.g. --param run_date=2024-03-01. Repeatable.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param_arg)]
    params: Vec<(String, String)>,
    /// Retries with the same key return the same job instead of starting another.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// The job's id (letters, digits, -, _, .), as `run --job-id`: a job id commits at most
    /// once; resubmitting it returns the job while it runs or after it succeeded, and runs
    /// it again after it failed. Default: a new id.
    #[arg(long)]
    job_id: Option<String>,
    /// Follow the job until it ends.
    #[arg(long)]
    wait: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// In-process workers.
    #[arg(long, default_value_t = default_workers())]
    workers: usize,
    /// Job id; a job id already committed to the table is not run again. Default: new id.
    #[arg(long)]
    job_id: Option<String>,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// Submit the job to the cluster described by this configuration instead of running it
    /// here, and wait for its outcome.
    #[arg(long, value_name = "CONFIG")]
    cluster: Option<PathBuf>,
    /// With --cluster: how long to wait for the outcome, in seconds.
    #[arg(long, default_value_t = 3600)]
    wait_secs: u64,
    /// Memory the run's tasks may hold in operators (hash tables, sorts, aggregations), e.g.
    /// 2GiB. Past it operators spill to --spill-dir; a task that still does not fit fails
    /// with the operator's name. Default: 60 % of the container's or machine's memory.
    #[arg(long, env = "NIGHTSHIFT_MEMORY_LIMIT", value_name = "SIZE", value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// Directory for spill files (default: the system's temporary directory).
    #[arg(long, env = "NIGHTSHIFT_SPILL_DIR", value_name = "DIR")]
    spill_dir: Option<PathBuf>,
    /// Cut the job into stages that exchange rows through shuffle files, as a cluster does,
    /// instead of one in-process stage (for comparisons and debugging).
    #[arg(long)]
    staged: bool,
}

fn parse_size(text: &str) -> Result<u64, String> {
    nightshift_core::session::parse_bytes(text)
}

#[derive(Args)]
struct CheckArgs {
    /// The pipeline spec (TOML).
    pipeline: PathBuf,
    /// Directory with a sample of each source: <source>.csv|.json|.parquet or <source>/.
    #[arg(long, value_name = "DIR")]
    sample: PathBuf,
    /// Override a [params] value, e.g. --param run_date=2024-03-01. Repeatable.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param_arg)]
    params: Vec<(String, String)>,
    /// Also write the cases as a JUnit XML report to FILE.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

#[derive(Args)]
struct HistoryArgs {
    /// The table, `namespace.table`.
    table: String,
    /// Warehouse directory of the embedded catalog (<warehouse>/catalog.db).
    #[arg(long, env = "NIGHTSHIFT_WAREHOUSE", default_value = "warehouse")]
    warehouse: PathBuf,
    /// Use the catalog of this cluster configuration instead of the warehouse's.
    #[arg(long, value_name = "CONFIG")]
    cluster: Option<PathBuf>,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["job", "last"])))]
struct ReportArgs {
    /// The job id (as given to `run --job-id`, or printed by `run`).
    job: Option<String>,
    /// The job that ran last (in this warehouse, or submitted last to the cluster).
    #[arg(long)]
    last: bool,
    /// Warehouse directory of the embedded runs (their records are kept in it).
    #[arg(long, env = "NIGHTSHIFT_WAREHOUSE", default_value = "warehouse")]
    warehouse: PathBuf,
    /// Read the job's record from this cluster (Redis) instead of the warehouse.
    #[arg(long, value_name = "CONFIG")]
    cluster: Option<PathBuf>,
    /// Where to write the page (default: report-<job>.html in the current directory).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("work").required(true).multiple(true)
    .args(["drop_partitions_older_than", "compact", "expire_older_than", "remove_orphans_older_than", "spec"])))]
struct MaintainArgs {
    /// The table, `namespace.table` (with --spec: the spec's target).
    #[arg(required_unless_present = "spec")]
    table: Option<String>,
    /// Maintain the target of this pipeline spec with the policies of its [maintenance]
    /// section (flags given as well override them).
    #[arg(long, value_name = "SPEC")]
    spec: Option<PathBuf>,
    /// Warehouse directory of the embedded catalog (<warehouse>/catalog.db).
    #[arg(long, env = "NIGHTSHIFT_WAREHOUSE", default_value = "warehouse")]
    warehouse: PathBuf,
    /// Maintain a table of this cluster: its catalog instead of the warehouse's, and
    /// --compact submitted as a job whose tasks rewrite the files on the cluster's workers
    /// (the other operations change metadata and run here).
    #[arg(long, value_name = "CONFIG")]
    cluster: Option<PathBuf>,
    /// Drop the partitions whose time range (from the first day/month/year/hour partition
    /// field, or identity of a date or timestamp) ended longer ago than this (e.g. 400d).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "AGE")]
    drop_partitions_older_than: Option<std::time::Duration>,
    /// Rewrite each partition's small data files (under three quarters of the target size)
    /// into files near the target size, when a partition has at least --min-input-files.
    #[arg(long)]
    compact: bool,
    /// Compaction's target file size (e.g. 128MiB; default: the table's
    /// write.target-file-size-bytes, else 512MiB).
    #[arg(long, value_parser = parse_size, value_name = "BYTES")]
    target_file_size: Option<u64>,
    /// Small files a partition needs before compaction rewrites it (default 2).
    #[arg(long)]
    min_input_files: Option<usize>,
    /// Expire snapshots created longer ago than this (e.g. 7d, 12h).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "AGE")]
    expire_older_than: Option<std::time::Duration>,
    /// Newest snapshots kept whatever their age (default 1; the current one always is).
    #[arg(long)]
    keep_last: Option<usize>,
    /// Remove files no snapshot references that are older than this (e.g. 3d). Keep it
    /// above the longest job: a running job's files are not committed yet.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "AGE")]
    remove_orphans_older_than: Option<std::time::Duration>,
    /// Say what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

#[derive(Args)]
struct BackfillArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// KEY=FIRST..LAST, both ends included: dates (run_date=2024-01-01..2024-01-31) or
    /// integers (month=1..12).
    #[arg(long, value_name = "KEY=FIRST..LAST")]
    param_range: String,
    /// Step between values: days for dates, units for integers.
    #[arg(long, default_value_t = 1)]
    step: u32,
    /// Name of this backfill, part of each value's job id: the same name resumes it, a new
    /// one redoes values an earlier backfill committed (after a fix to the SQL). Default:
    /// no name.
    #[arg(long, value_name = "NAME")]
    run_id: Option<String>,
    /// Values run at once (commits to one table then retry on each other; each value is
    /// still one snapshot).
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// In-process workers per value.
    #[arg(long, default_value_t = default_workers())]
    workers: usize,
    /// Submit each value's job to the cluster described by this configuration (through its
    /// job queue, as `run --cluster`) instead of running it here.
    #[arg(long, value_name = "CONFIG")]
    cluster: Option<PathBuf>,
    /// With --cluster: how long to wait for each value's outcome, in seconds.
    #[arg(long, default_value_t = 3600)]
    wait_secs: u64,
    /// Submit each value's job through this coordinator's job API (under the value's job
    /// id; the token from NIGHTSHIFT_TOKEN, TLS as for `submit`) and follow it to its end.
    #[arg(long, value_name = "URL", conflicts_with = "cluster")]
    api: Option<String>,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// Memory all running values may hold in operators together, e.g. 2GiB (see `run`).
    #[arg(long, env = "NIGHTSHIFT_MEMORY_LIMIT", value_name = "SIZE", value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// Directory for spill files.
    #[arg(long, env = "NIGHTSHIFT_SPILL_DIR", value_name = "DIR")]
    spill_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Aligned text (colours on a terminal).
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    /// Aligned text for people.
    Text,
    /// One JSON object for scripts.
    Json,
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The stack of every thread that runs a command. DataFusion plans (names, displays,
/// rewrites) expressions recursively, some of it without its stack guard, so a deep
/// expression (`a + b + ...`, thousands of terms) needs far more than tokio's 2 MiB;
/// the pages are only committed as they are used.
const PLANNING_STACK_BYTES: usize = 256 << 20;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.log_format);
    // Test builds only: failpoints named in `FAILPOINTS` (e.g. `worker-task-delay=return(1500)`).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(PLANNING_STACK_BYTES)
        .build()
        .expect("tokio runtime");
    // The command runs on a thread with the same large stack, not on the main thread.
    let command = move || {
        runtime.block_on(async {
            match cli.command {
                Command::Run(args) => run(args).await,
                Command::Backfill(args) => backfill(args).await,
                Command::Maintain(args) => maintain(args).await,
                Command::History(args) => history(args).await,
                Command::Check(args) => check(args).await,
                Command::Report(args) => report(args).await,
                Command::Validate(args) => validate(args).await,
                Command::Dlq { command } => dlq(command).await,
                Command::ExampleData { dir, scale, parts } => example_data(&dir, scale, parts),
                Command::Coordinator {
                    config,
                    max_jobs,
                    listen,
                    tokens_file,
                    no_auth,
                    tls_cert,
                    tls_key,
                    tls_client_ca,
                    metrics_listen,
                } => {
                    let tls = tls_cert.zip(tls_key).map(|(cert, key)| {
                        nightshift_coordinator::api::TlsFiles {
                            cert,
                            key,
                            client_ca: tls_client_ca,
                        }
                    });
                    let api = ApiServe {
                        listen,
                        tokens_file,
                        no_auth,
                        tls,
                    };
                    coordinator(&config, max_jobs, api, metrics_listen).await
                }
                Command::Submit(args) => submit(args).await,
                Command::Status { api, job_id } => status(&api, &job_id).await,
                Command::Watch { api, job_id } => watch(&api, &job_id).await,
                Command::Cancel { api, job_id } => cancel(&api, &job_id).await,
                Command::Jobs {
                    api,
                    pipeline,
                    state,
                    limit,
                    page_token,
                } => jobs(&api, client::list(pipeline, state, limit, page_token)).await,
                Command::Worker {
                    config,
                    id,
                    metrics_listen,
                    drain_grace_secs,
                } => {
                    let ops = nightshift::cluster::WorkerOps {
                        metrics_listen,
                        drain_grace: std::time::Duration::from_secs(drain_grace_secs),
                    };
                    worker(&config, id, ops).await
                }
            }
        })
    };
    std::thread::Builder::new()
        .name("nightshift".into())
        .stack_size(PLANNING_STACK_BYTES)
        .spawn(command)
        .expect("start the command's thread")
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn init_tracing(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RedactingWriter(std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // One object per line: the event's fields at the top level, the fields of the
        // innermost span (a task's job_id, stage, task, attempt) under "span" and of every
        // enclosing span under "spans", so a job's lines join across processes by job_id.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

fn load(args: &CommonArgs) -> Result<ResolvedSpec, ExitCode> {
    load_spec(&args.pipeline, &args.params).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    })
}

fn job_options(args: &CommonArgs, job_id: JobId, workers: usize) -> JobOptions {
    JobOptions {
        job_id,
        workers,
        target_task_bytes: args.target_task_bytes,
        partitions: args.partitions,
        max_task_attempts: None,
    }
}

async fn run(args: RunArgs) -> ExitCode {
    // Refused before a job exists: with `--output json` the JSON says so too, as for a job
    // that failed (a script reading stdout gets an object, not nothing).
    let refused = |error: nightshift_core::CoreError, shown: &dyn std::fmt::Display| {
        let error = JobError::Invalid(error);
        if matches!(args.output, OutputFormat::Json) {
            outln!(
                "{}",
                output::error_json(args.job_id.as_deref().unwrap_or_default(), &error)
            );
        }
        eprintln!("error: {shown}");
        ExitCode::from(output::exit_code(&error))
    };
    let spec = match load_spec(&args.common.pipeline, &args.common.params) {
        Ok(spec) => spec,
        Err(e) => {
            let shown = e.to_string();
            return refused(nightshift_core::CoreError::Spec(e), &shown);
        }
    };
    let job_id = match args
        .job_id
        .as_deref()
        .map(JobId::parse)
        .unwrap_or_else(|| Ok(JobId::generate()))
    {
        Ok(id) => id,
        Err(e) => return refused(nightshift_core::CoreError::Protocol(e.clone()), &e),
    };
    if let Some(config) = &args.cluster {
        return run_on_cluster(config, &args, &job_id).await;
    }
    let options = job_options(&args.common, job_id.clone(), args.workers);
    let mut embedded = EmbeddedOptions::new(args.common.warehouse.clone(), args.workers);
    embedded.memory =
        MemorySettings::new(args.memory_limit, args.spill_dir.clone(), embedded.workers);
    embedded.staged = args.staged;
    let progress = StageBars::new(std::io::stderr().is_terminal());
    let on_event = |event: JobEvent| progress.on_event(event);
    let result = run_embedded(&spec, &embedded, &options, &on_event).await;
    progress.finish();
    match (result, args.output) {
        (Ok(report), OutputFormat::Text) => {
            out!("{}", output::report_text(&report));
            ExitCode::SUCCESS
        }
        (Ok(report), OutputFormat::Json) => {
            outln!("{}", output::report_json(&report));
            ExitCode::SUCCESS
        }
        (Err(e), format) => {
            if matches!(format, OutputFormat::Json) {
                outln!("{}", output::error_json(job_id.as_str(), &e));
            }
            eprintln!("error: job {job_id} failed, nothing was committed: {e}");
            ExitCode::from(output::exit_code(&e))
        }
    }
}

async fn backfill(args: BackfillArgs) -> ExitCode {
    use nightshift::backfill::{check_mode, parse_param_range, run_backfill, summary_table};
    let range = match parse_param_range(&args.param_range, args.step) {
        Ok(range) => range,
        Err(e) => {
            eprintln!("error: --param-range: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let mut first_params = args.common.params.clone();
    first_params.push((range.key.clone(), range.values[0].clone()));
    let first = match load_spec(&args.common.pipeline, &first_params) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    if let Err(e) = check_mode(&first, args.run_id.as_deref()) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_INVALID);
    }
    let mut embedded = EmbeddedOptions::new(args.common.warehouse.clone(), args.workers);
    let parallel = args.parallel.max(1);
    // Values running at once share the limit.
    embedded.memory = MemorySettings::new(
        args.memory_limit.map(|limit| limit / parallel as u64),
        args.spill_dir.clone(),
        embedded.workers,
    );
    let bar = indicatif::ProgressBar::new(range.values.len() as u64);
    if std::io::stderr().is_terminal() {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} values, {elapsed} (eta {eta}) {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("backfill {}", range.key));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let options = |job_id| job_options(&args.common, job_id, args.workers);
    let cluster = match args.cluster.as_deref().map(load_cluster_config).transpose() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let token = match (&args.api, client::token_from_env()) {
        (Some(_), Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
        (_, token) => token.ok().flatten(),
    };
    let backend = match (&cluster, &args.api) {
        (Some(config), _) => nightshift::backfill::Backend::Cluster {
            config,
            timeout: std::time::Duration::from_secs(args.wait_secs),
        },
        (None, Some(server)) => nightshift::backfill::Backend::Api {
            server,
            token: token.clone(),
        },
        (None, None) => nightshift::backfill::Backend::Embedded {
            embedded: &embedded,
            options: &options,
        },
    };
    let outcomes = run_backfill(
        &args.common.pipeline,
        &args.common.params,
        &range,
        args.run_id.as_deref(),
        &backend,
        parallel,
        |outcome| {
            bar.inc(1);
            bar.set_message(format!("{} {}", outcome.value, outcome.status));
            // One line per value as it ends, so a log shows how far a backfill got even
            // when it is stopped before its table is printed.
            bar.suspend(|| match &outcome.error {
                Some(error) => eprintln!("error: {}: {error}", outcome.value),
                None if outcome.job_id.is_empty() => {}
                None => eprintln!(
                    "{}={}: {} ({} rows, job {})",
                    range.key, outcome.value, outcome.status, outcome.rows, outcome.job_id
                ),
            });
        },
    )
    .await;
    bar.finish_and_clear();
    match args.output {
        OutputFormat::Text => out!("{}", summary_table(&range.key, &outcomes)),
        OutputFormat::Json => outln!(
            "{}",
            serde_json::json!({ "param": range.key, "values": outcomes })
        ),
    }
    if outcomes.iter().any(|o| o.status == "failed") {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

async fn maintain(args: MaintainArgs) -> ExitCode {
    use nightshift::maintain::{Maintenance, maintain, report_text};
    let (table, policies) = match maintenance_target(&args) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let catalog = match table_catalog(&args.warehouse, args.cluster.as_deref()) {
        Ok(catalog) => catalog,
        Err(code) => return code,
    };
    let cluster = match args.cluster.as_deref().map(load_cluster_config) {
        Some(Ok(config)) => Some(config),
        Some(Err(code)) => return code,
        None => None,
    };
    // Flags override the spec's [maintenance] policies.
    let work = Maintenance {
        expire: args
            .expire_older_than
            .or(policies.expire_age())
            .map(
                |older_than| nightshift_core::table::maintain::ExpirePolicy {
                    older_than,
                    keep_last: args.keep_last.or(policies.keep_last).unwrap_or(1),
                },
            ),
        orphans_older_than: args.remove_orphans_older_than.or(policies.orphans_age()),
        drop_partitions_older_than: args
            .drop_partitions_older_than
            .or(policies.drop_partitions_age()),
        compact: (args.compact || policies.compact).then_some(
            nightshift_core::table::compact::CompactPolicy {
                target_file_bytes: args.target_file_size.or(policies.target_file_size_bytes),
                min_input_files: args
                    .min_input_files
                    .or(policies.min_input_files)
                    .unwrap_or(2),
            },
        ),
        dry_run: args.dry_run,
    };
    match maintain(&catalog, &table, &work, cluster.as_ref()).await {
        Ok(report) => {
            match args.output {
                OutputFormat::Text => out!("{}", report_text(&report)),
                OutputFormat::Json => outln!(
                    "{}",
                    serde_json::to_string(&report).expect("report serializes")
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: maintenance of {table} failed: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// The table to maintain and the spec's `[maintenance]` policies (none without --spec).
fn maintenance_target(
    args: &MaintainArgs,
) -> Result<(String, nightshift_spec::MaintenanceSection), String> {
    let Some(path) = &args.spec else {
        let table = args.table.clone().ok_or("give the table, or --spec")?;
        return Ok((table, Default::default()));
    };
    let spec = load_spec(path, &[]).map_err(|e| e.to_string())?;
    let target = spec.spec.target.table;
    if let Some(table) = args.table.as_ref().filter(|t| **t != target) {
        return Err(format!(
            "{} publishes to {target}, not {table}; give one of them",
            path.display()
        ));
    }
    let explicit = args.drop_partitions_older_than.is_some()
        || args.compact
        || args.expire_older_than.is_some()
        || args.remove_orphans_older_than.is_some();
    if spec.spec.maintenance.is_empty() && !explicit {
        return Err(format!(
            "{} has no [maintenance] policy (drop_partitions_older_than, compact, expire_older_than, remove_orphans_older_than) and no flag asks for one",
            path.display()
        ));
    }
    Ok((target, spec.spec.maintenance))
}

/// The catalog of a cluster configuration, or else the embedded warehouse's.
fn table_catalog(
    warehouse: &std::path::Path,
    cluster: Option<&std::path::Path>,
) -> Result<nightshift_core::table::CatalogConfig, ExitCode> {
    let catalog = match cluster {
        Some(path) => load_cluster_config(path)?
            .install()
            .map(|(catalog, _)| catalog)
            .map_err(|e| e.to_string()),
        // A command that reads tables does not make a catalog where none is: a mistyped
        // `--warehouse`, or the wrong working directory, left an empty one behind.
        None => match existing_catalog_db(warehouse) {
            Err(message) => Err(message),
            Ok(_) => prepare_warehouse(warehouse)
                .and_then(|w| embedded_catalog(&w))
                .map_err(|e| e.to_string()),
        },
    };
    catalog.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    })
}

/// The embedded catalog of `warehouse`, if there is one; else why not, naming the path.
fn existing_catalog_db(warehouse: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let db = warehouse.join("catalog.db");
    if db.is_file() {
        return Ok(db);
    }
    let shown = std::path::absolute(&db).unwrap_or(db);
    Err(format!(
        "no catalog at {}: no pipeline has run into warehouse {} (--warehouse; a relative one is read from the working directory)",
        shown.display(),
        warehouse.display()
    ))
}

async fn check(args: CheckArgs) -> ExitCode {
    use nightshift::check::{cases_text, check_pipeline, junit_xml};
    let loaded = load_spec(&args.pipeline, &args.params).map_err(|e| e.to_string());
    let spec_is_wrong = loaded.is_err();
    let pipeline = loaded.as_ref().map_or_else(
        |_| args.pipeline.display().to_string(),
        |spec| spec.spec.pipeline.name.clone(),
    );
    let cases = check_pipeline(loaded, &args.sample).await;
    if let Some(path) = &args.junit
        && let Err(e) = std::fs::write(path, junit_xml(&pipeline, &cases))
    {
        eprintln!("error: cannot write {}: {e}", path.display());
        return ExitCode::from(EXIT_FAILED);
    }
    match args.output {
        OutputFormat::Text => out!("{}", cases_text(&pipeline, &cases)),
        OutputFormat::Json => outln!(
            "{}",
            serde_json::json!({ "pipeline": pipeline, "cases": cases })
        ),
    }
    if spec_is_wrong {
        ExitCode::from(EXIT_INVALID)
    } else if cases.iter().any(|c| c.fails_the_run()) {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

async fn history(args: HistoryArgs) -> ExitCode {
    use nightshift::history::{history, history_text};
    let catalog = match table_catalog(&args.warehouse, args.cluster.as_deref()) {
        Ok(catalog) => catalog,
        Err(code) => return code,
    };
    match history(&catalog, &args.table).await {
        Ok(entries) => {
            match args.output {
                OutputFormat::Text => out!("{}", history_text(&args.table, &entries)),
                OutputFormat::Json => outln!(
                    "{}",
                    serde_json::to_string(&entries).expect("history serializes")
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot read the history of {}: {e}", args.table);
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn report(args: ReportArgs) -> ExitCode {
    use nightshift::report::{Which, cluster_record, embedded_record, write_page};
    let which = match args.job {
        Some(job) => Which::Job(job),
        None => Which::Last,
    };
    let record = match &args.cluster {
        Some(path) => match load_cluster_config(path) {
            Ok(config) => cluster_record(&config, &which).await,
            Err(code) => return code,
        },
        None => embedded_record(&args.warehouse, &which),
    };
    let written = record
        .and_then(|record| write_page(&record, args.out.as_deref()).map(|path| (record, path)));
    match written {
        Ok((record, path)) => {
            outln!(
                "report of job {} ({}) written to {}",
                record.report.job_id,
                record.status,
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn load_cluster_config(path: &std::path::Path) -> Result<ClusterConfig, ExitCode> {
    ClusterConfig::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    })
}

async fn run_on_cluster(config: &std::path::Path, args: &RunArgs, job_id: &JobId) -> ExitCode {
    let config = match load_cluster_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let outcome = nightshift::cluster::submit_and_wait(
        &config,
        &args.common.pipeline,
        job_id,
        args.common.params.clone(),
        std::time::Duration::from_secs(args.wait_secs),
    )
    .await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let succeeded = outcome["status"] == "succeeded";
    match args.output {
        OutputFormat::Json => outln!("{outcome}"),
        OutputFormat::Text if succeeded => {
            match serde_json::from_value::<nightshift_coordinator::JobReport>(outcome.clone()) {
                Ok(report) => out!("{}", output::report_text(&report)),
                Err(_) => outln!("{outcome}"),
            }
        }
        OutputFormat::Text => {}
    }
    if succeeded {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "error: job {job_id} failed, nothing was committed: {}",
        outcome["error"].as_str().unwrap_or("unknown error")
    );
    ExitCode::from(if outcome["kind"] == "invalid" {
        EXIT_INVALID
    } else {
        EXIT_FAILED
    })
}

/// How the coordinator serves its job API.
struct ApiServe {
    listen: Option<std::net::SocketAddr>,
    tokens_file: Option<PathBuf>,
    no_auth: bool,
    tls: Option<nightshift_coordinator::api::TlsFiles>,
}

async fn coordinator(
    config: &std::path::Path,
    max_jobs: usize,
    api: ApiServe,
    metrics_listen: Option<std::net::SocketAddr>,
) -> ExitCode {
    let config = match load_cluster_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let ApiServe {
        listen,
        tokens_file,
        no_auth,
        tls,
    } = api;
    let api = match listen {
        None => None,
        Some(listen) => {
            let env = std::env::var("NIGHTSHIFT_API_TOKENS").unwrap_or_default();
            let file = match &tokens_file {
                None => None,
                Some(file) => match std::fs::read_to_string(file) {
                    Ok(text) => Some((file.display().to_string(), text)),
                    Err(e) => {
                        eprintln!("error: cannot read {}: {e}", file.display());
                        return ExitCode::from(EXIT_INVALID);
                    }
                },
            };
            let tokens = match nightshift_coordinator::clients::configured_tokens(
                &env,
                file.as_ref()
                    .map(|(path, text)| (path.as_str(), text.as_str())),
            ) {
                Ok(tokens) => tokens,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_INVALID);
                }
            };
            if tokens.is_empty() && !no_auth {
                eprintln!(
                    "error: the job API needs bearer tokens (--tokens-file or NIGHTSHIFT_API_TOKENS); \
                     --no-auth serves it without authentication"
                );
                return ExitCode::from(EXIT_INVALID);
            }
            Some(nightshift_coordinator::service::ApiOptions {
                listen,
                tokens,
                tls,
            })
        }
    };
    let served = nightshift_coordinator::service::serve_until(
        &config,
        max_jobs,
        api,
        metrics_listen,
        nightshift::cluster::terminated(),
    )
    .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: coordinator stopped: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn worker(
    config: &std::path::Path,
    id: Option<String>,
    ops: nightshift::cluster::WorkerOps,
) -> ExitCode {
    let config = match load_cluster_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let id = id.unwrap_or_else(|| format!("worker-{}", std::process::id()));
    match nightshift::cluster::run_worker(&config, &id, ops).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: worker {id} stopped: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

async fn dlq(command: DlqCommand) -> ExitCode {
    let config_path = match &command {
        DlqCommand::List { config, .. }
        | DlqCommand::Replay {
            tasks: DeadTasksOf { config, .. },
        }
        | DlqCommand::Purge {
            tasks: DeadTasksOf { config, .. },
        } => config.clone(),
    };
    let config = match load_cluster_config(&config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match command {
        DlqCommand::List { json, .. } => match nightshift::cluster::dead_letters(&config).await {
            Ok(letters) => {
                if json {
                    for letter in &letters {
                        outln!("{}", serde_json::to_string(letter).expect("serializes"));
                    }
                } else {
                    out!("{}", output::dead_letters_text(&letters));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_FAILED)
            }
        },
        DlqCommand::Replay { ref tasks } | DlqCommand::Purge { ref tasks } => {
            let (action, text): (_, fn(&nightshift::cluster::Settled) -> String) =
                if matches!(command, DlqCommand::Replay { .. }) {
                    (DlqAction::Replay, output::replayed_text)
                } else {
                    (DlqAction::Purge, output::purged_text)
                };
            match nightshift::cluster::settle_dead_letters(&config, tasks.job_id.as_deref(), action)
                .await
            {
                Ok(settled) => {
                    out!("{}", text(&settled));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
    }
}

/// The server this invocation talks to, for hints on transport errors.
static SERVER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn api_client(api: &ApiArgs) -> Result<client::ApiClient, ExitCode> {
    let _ = SERVER.set(api.server.clone());
    let token = client::token_from_env().map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    })?;
    client::connect(&api.server, token).await.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_FAILED)
    })
}

fn rpc_error(status: tonic::Status) -> ExitCode {
    eprintln!("error: {} ({:?})", status.message(), status.code());
    let server = SERVER.get().map_or("", String::as_str);
    if let Some(hint) = client::transport_hint(&status, server) {
        eprintln!("hint: {hint}");
    }
    ExitCode::from(match status.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::AlreadyExists
        | tonic::Code::ResourceExhausted
        | tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated => EXIT_INVALID,
        _ => EXIT_FAILED,
    })
}

async fn submit(args: SubmitArgs) -> ExitCode {
    let request = match client::submit_request(
        &args.pipeline,
        args.params.clone(),
        args.idempotency_key.clone(),
    ) {
        Ok(r) => nightshift_proto::v1::SubmitJobRequest {
            job_id: args.job_id.clone().unwrap_or_default(),
            ..r
        },
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let mut api = match api_client(&args.api).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let response = match api.submit_job(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return rpc_error(status),
    };
    outln!("{}", response.job_id);
    if !response.created {
        match &args.idempotency_key {
            Some(key) => eprintln!(
                "job {} was already submitted with idempotency key `{key}`; nothing new was queued",
                response.job_id
            ),
            None => eprintln!(
                "job {} is already queued, running or committed; nothing new was queued",
                response.job_id
            ),
        }
    }
    if args.wait {
        // The coordinator just answered for it: a job unknown later lost its record.
        return follow(&mut api, &response.job_id, true).await;
    }
    ExitCode::SUCCESS
}

/// Follows `job_id` until it finishes, and exits as it did. A coordinator that restarts or
/// cannot reach Redis for a while does not end the watch (the job goes on): the watch is
/// opened again, as [`client::follow_again_after`] decides. `known`: the coordinator has
/// just answered for the job (a submission), so a later "no such job" means its record
/// was lost, not that there is none.
async fn follow(api: &mut client::ApiClient, job_id: &str, known: bool) -> ExitCode {
    // On a terminal: a bar per stage; otherwise one line per change, for scheduler logs.
    let terminal = std::io::stderr().is_terminal();
    let bars = StageBars::new(terminal);
    let mut last: Option<nightshift_proto::v1::Job> = None;
    let mut lost_since = std::time::Instant::now();
    let mut attempt = 0;
    while last.as_ref().and_then(client::exit_code).is_none() {
        let ended = match api.watch_job(client::get(job_id)).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(job)) => {
                            if terminal {
                                bars.on_job(&job);
                            } else if last.as_ref() != Some(&job) {
                                eprintln!("{}", client::describe(&job));
                            }
                            last = Some(job);
                            lost_since = std::time::Instant::now();
                            attempt = 0;
                        }
                        Ok(None) => break None,
                        Err(status) => break Some(status),
                    }
                }
            }
            Err(status) => Some(status),
        };
        if last.as_ref().and_then(client::exit_code).is_some() {
            break;
        }
        let code = ended.as_ref().map(tonic::Status::code);
        let seen = known || last.is_some();
        match client::follow_again_after(code, seen, lost_since.elapsed(), attempt) {
            Some(pause) => {
                let why = ended
                    .as_ref()
                    .map_or("the coordinator closed the watch", |s| s.message());
                eprintln!("job {job_id}: lost the watch ({why}); watching again in {pause:?}");
                attempt += 1;
                tokio::time::sleep(pause).await;
            }
            None => {
                bars.finish();
                return match ended {
                    Some(status) => rpc_error(status),
                    None => ExitCode::from(EXIT_FAILED),
                };
            }
        }
    }
    bars.finish();
    if let (true, Some(job)) = (terminal, &last) {
        eprintln!("{}", client::describe(job));
    }
    match last.as_ref().and_then(client::exit_code) {
        Some(code) => ExitCode::from(code),
        None => ExitCode::from(EXIT_FAILED),
    }
}

async fn status(api: &ApiArgs, job_id: &str) -> ExitCode {
    let mut api = match api_client(api).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match api.get_job(client::get(job_id)).await {
        Ok(job) => {
            outln!("{}", client::describe(job.get_ref()));
            ExitCode::SUCCESS
        }
        Err(status) => rpc_error(status),
    }
}

/// `watch`: a coordinator that does not answer yet (restarting) is waited for as [`follow`]
/// waits for one that goes away.
async fn watch(api: &ApiArgs, job_id: &str) -> ExitCode {
    let since = std::time::Instant::now();
    let mut attempt = 0;
    loop {
        let token = match client::token_from_env() {
            Ok(token) => token,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_INVALID);
            }
        };
        match client::connect(&api.server, token).await {
            Ok(mut c) => {
                let _ = SERVER.set(api.server.clone());
                return follow(&mut c, job_id, false).await;
            }
            Err(e) => {
                let unavailable = Some(tonic::Code::Unavailable);
                let Some(pause) =
                    client::follow_again_after(unavailable, false, since.elapsed(), attempt)
                else {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_FAILED);
                };
                eprintln!("job {job_id}: {e}; trying again in {pause:?}");
                attempt += 1;
                tokio::time::sleep(pause).await;
            }
        }
    }
}

async fn cancel(api: &ApiArgs, job_id: &str) -> ExitCode {
    let mut api = match api_client(api).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match api.cancel_job(client::get(job_id)).await {
        Ok(job) => {
            outln!("{}", client::describe(job.get_ref()));
            ExitCode::SUCCESS
        }
        Err(status) => rpc_error(status),
    }
}

async fn jobs(api: &ApiArgs, request: ListJobsRequest) -> ExitCode {
    let mut api = match api_client(api).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match api.list_jobs(request).await {
        Ok(list) => {
            let list = list.into_inner();
            for job in &list.jobs {
                outln!("{}", client::describe(job));
            }
            if !list.next_page_token.is_empty() {
                eprintln!("more jobs: --page-token {}", list.next_page_token);
            }
            ExitCode::SUCCESS
        }
        Err(status) => rpc_error(status),
    }
}

async fn validate(args: CommonArgs) -> ExitCode {
    let spec = match load(&args) {
        Ok(spec) => spec,
        Err(code) => return code,
    };
    let options = job_options(&args, JobId::generate(), default_workers());
    // Compare with an existing table only if the catalog exists: validate writes nothing.
    let catalog_db = args.warehouse.join("catalog.db");
    let catalog = if catalog_db.exists() {
        match prepare_warehouse(&args.warehouse).and_then(|w| embedded_catalog(&w)) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_INVALID);
            }
        }
    } else {
        None
    };
    match validate_job(&spec, &options, catalog.as_ref()).await {
        Ok(report) => {
            outln!("pipeline {} is valid", spec.spec.pipeline.name);
            outln!("\nsources:");
            for s in &report.sources {
                outln!(
                    "  {:<16} {:<8} {} file(s), {}  {}",
                    s.name,
                    s.format.to_string(),
                    s.files,
                    indicatif::HumanBytes(s.bytes),
                    s.location
                );
            }
            outln!(
                "\ntarget {} (mode {}, {} partitions per stage), output schema:",
                spec.spec.target.table,
                spec.spec.target.mode,
                report.partitions
            );
            for field in report.output_schema.fields() {
                outln!("  {:<24} {}", field.name(), field.data_type());
            }
            if !report.schema_changes.is_empty() {
                outln!(
                    "\nschema changes a run commits with its rows (schema_evolution = \"add_columns\"):"
                );
                for change in &report.schema_changes {
                    outln!("  {change}");
                }
            }
            outln!("\nplan:\n{}", report.plan.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                JobError::Invalid(_) => EXIT_INVALID,
                _ => EXIT_FAILED,
            })
        }
    }
}

fn example_data(dir: &std::path::Path, scale: f64, parts: usize) -> ExitCode {
    match nightshift::example_data::generate(dir, scale, parts) {
        Ok(data) => {
            outln!(
                "wrote {} orders, {} line items, {} customers in {} files under {}",
                data.orders,
                data.lineitems,
                data.customers,
                data.files,
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
