//! Every metric Nightshift exports, in one place: names, labels, help texts and one function
//! per event. Call sites say what happened (`task_finished(...)`, `commit_finished(...)`);
//! this module decides how it is counted. Metrics go to whatever recorder the process
//! installed (the cluster processes install the Prometheus exporter); without one they cost
//! nothing.
//!
//! Label values are always from small fixed sets (stage kinds, outcomes, queue names, RPC
//! methods, gRPC codes): never job ids, which would make every job a new series.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::transport::JobState;

/// Jobs this coordinator runs, by state (`running`, `committing`).
pub const JOBS: &str = "nightshift_jobs";
/// Jobs that ended on this coordinator, by outcome.
pub const JOBS_FINISHED: &str = "nightshift_jobs_finished_total";
/// Task outputs the coordinator accepted (the first successful result of each task).
pub const TASKS_COMPLETED: &str = "nightshift_tasks_completed_total";
/// Task messages published, first attempts only.
pub const TASKS_PUBLISHED: &str = "nightshift_tasks_published_total";
/// Task messages published again (a retryable failure or an expired lease).
pub const TASK_RETRIES: &str = "nightshift_task_retries_total";
/// Running tasks whose lease expired (their worker froze, died or lost its network).
pub const LEASE_EXPIRIES: &str = "nightshift_task_lease_expiries_total";
/// Dead-lettered tasks the coordinator received as failures.
pub const TASKS_DEAD_LETTERED: &str = "nightshift_tasks_dead_lettered_total";
/// Messages waiting in a queue, as the coordinator last saw them (`tasks`, `jobs`, `dead`).
pub const QUEUE_MESSAGES: &str = "nightshift_queue_messages";
/// Consumers of a queue, as the coordinator last saw them.
pub const QUEUE_CONSUMERS: &str = "nightshift_queue_consumers";
/// Time of one commit of a job's snapshot, retries on conflict included.
pub const COMMIT_DURATION: &str = "nightshift_commit_duration_seconds";
/// Commit attempts that lost the catalog's compare-and-swap to another writer.
pub const COMMIT_CONFLICTS: &str = "nightshift_commit_conflicts_total";
/// Calls of the job API, by method and gRPC code.
pub const API_REQUESTS: &str = "nightshift_api_requests_total";
/// Time to answer a job API call, by method.
pub const API_DURATION: &str = "nightshift_api_request_duration_seconds";

/// Tasks this worker is running now (0 or 1 with prefetch 1).
pub const TASKS_RUNNING: &str = "nightshift_tasks_running";
/// Tasks this worker finished, by stage kind and outcome.
pub const TASKS_FINISHED: &str = "nightshift_tasks_finished_total";
/// Time to run one task, by stage kind.
pub const TASK_DURATION: &str = "nightshift_task_duration_seconds";
/// Task messages that reached this worker again (their earlier consumer died or drained).
pub const TASK_REDELIVERIES: &str = "nightshift_task_redeliveries_total";
/// Rows and bytes tasks wrote: shuffle objects (`stage_kind="shuffle"`) or data files (`"table"`).
pub const ROWS_WRITTEN: &str = "nightshift_rows_written_total";
pub const BYTES_WRITTEN: &str = "nightshift_bytes_written_total";
/// Rows and bytes tasks read: source files and shuffle objects.
pub const ROWS_READ: &str = "nightshift_rows_read_total";
pub const BYTES_READ: &str = "nightshift_bytes_read_total";
/// Bytes of shuffle objects written (the intermediate data between stages).
pub const SHUFFLE_BYTES: &str = "nightshift_shuffle_bytes_written_total";
/// Broadcast joins run by a worker's tasks, by `table`: `built` (the task built the hash
/// table) or `shared` (it probed the table an earlier task of its stage built there).
pub const BROADCAST_JOINS: &str = "nightshift_broadcast_joins_total";
/// Task lease renewals that failed (Redis unreachable).
pub const LEASE_RENEWAL_FAILURES: &str = "nightshift_task_lease_renewal_failures_total";
/// Graceful stops (SIGTERM), by what happened to the running task.
pub const DRAINS: &str = "nightshift_drains_total";

/// Whether each dependency answered the last readiness check (1) or not (0).
pub const DEPENDENCY_UP: &str = "nightshift_dependency_up";
/// 1, labelled with the version of this build.
pub const BUILD_INFO: &str = "nightshift_build_info";

/// What a stage writes: `shuffle` (an intermediate stage) or `table` (the final stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    Shuffle,
    Table,
    /// The last stage of a `[[check]]` query: counts rows, writes nothing.
    Check,
}

impl StageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Shuffle => "shuffle",
            StageKind::Table => "table",
            StageKind::Check => "check",
        }
    }
}

/// How a task ended on a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    Succeeded,
    Failed,
    /// Not run: its job had already ended.
    Skipped,
}

impl TaskOutcome {
    fn as_str(self) -> &'static str {
        match self {
            TaskOutcome::Succeeded => "succeeded",
            TaskOutcome::Failed => "failed",
            TaskOutcome::Skipped => "skipped",
        }
    }
}

/// What a graceful stop did with the running task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// No task was running.
    Idle,
    /// The running task finished within the grace period and was acked.
    Finished,
    /// The grace period ran out: the task was handed back to the queue.
    Requeued,
}

impl DrainOutcome {
    fn as_str(self) -> &'static str {
        match self {
            DrainOutcome::Idle => "idle",
            DrainOutcome::Finished => "finished",
            DrainOutcome::Requeued => "requeued",
        }
    }
}

/// Bucket bounds (seconds) for every `_seconds` histogram: 5 ms to 30 min.
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0,
];

/// Registers help texts and units, and sets the series a scrape should always show (at 0
/// until something happens), so dashboards and alerts see every family from the start.
pub fn describe_all() {
    describe_gauge!(JOBS, "Jobs this coordinator runs, by state");
    describe_counter!(
        JOBS_FINISHED,
        "Jobs that ended on this coordinator, by outcome"
    );
    describe_counter!(
        TASKS_COMPLETED,
        "Task outputs accepted by the coordinator (first successful result per task)"
    );
    describe_counter!(TASKS_PUBLISHED, "Tasks published (first attempts)");
    describe_counter!(
        TASK_RETRIES,
        "Tasks published again after a retryable failure or an expired lease"
    );
    describe_counter!(LEASE_EXPIRIES, "Running tasks whose lease expired");
    describe_counter!(
        TASKS_DEAD_LETTERED,
        "Tasks dead-lettered after the queue's delivery limit, received by the coordinator"
    );
    describe_gauge!(QUEUE_MESSAGES, "Messages ready in a queue, as last sampled");
    describe_gauge!(QUEUE_CONSUMERS, "Consumers of a queue, as last sampled");
    describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "Time to commit a job's snapshot, conflict retries included"
    );
    describe_counter!(
        COMMIT_CONFLICTS,
        "Commit attempts that lost the catalog's compare-and-swap"
    );
    describe_counter!(API_REQUESTS, "Job API calls by method and gRPC code");
    describe_histogram!(
        API_DURATION,
        Unit::Seconds,
        "Job API call latency by method"
    );
    describe_gauge!(TASKS_RUNNING, "Tasks running on this worker");
    describe_counter!(TASKS_FINISHED, "Tasks finished by this worker");
    describe_histogram!(TASK_DURATION, Unit::Seconds, "Task run time by stage kind");
    describe_counter!(
        TASK_REDELIVERIES,
        "Task messages delivered again to this worker"
    );
    describe_counter!(ROWS_WRITTEN, "Rows written by tasks");
    describe_counter!(BYTES_WRITTEN, Unit::Bytes, "Bytes written by tasks");
    describe_counter!(ROWS_READ, "Rows read by tasks");
    describe_counter!(BYTES_READ, Unit::Bytes, "Bytes read by tasks");
    describe_counter!(SHUFFLE_BYTES, Unit::Bytes, "Shuffle bytes written");
    describe_counter!(
        BROADCAST_JOINS,
        "Broadcast joins run by tasks, by whether the task built the table or shared another task's"
    );
    describe_counter!(LEASE_RENEWAL_FAILURES, "Task lease renewals that failed");
    describe_counter!(
        DRAINS,
        "Graceful stops by what happened to the running task"
    );
    describe_gauge!(
        DEPENDENCY_UP,
        "1 if the dependency answered the last readiness check"
    );
    describe_gauge!(BUILD_INFO, "Build of this process");
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Series of a coordinator that exist from its start (at 0).
pub fn register_coordinator() {
    for state in ["running", "committing"] {
        gauge!(JOBS, "state" => state).set(0.0);
    }
    for outcome in ["succeeded", "failed", "cancelled", "invalid"] {
        counter!(JOBS_FINISHED, "outcome" => outcome).absolute(0);
    }
    for name in [
        TASKS_COMPLETED,
        TASKS_PUBLISHED,
        TASK_RETRIES,
        LEASE_EXPIRIES,
        TASKS_DEAD_LETTERED,
        COMMIT_CONFLICTS,
    ] {
        counter!(name).absolute(0);
    }
}

/// Series of a worker that exist from its start (at 0).
pub fn register_worker() {
    gauge!(TASKS_RUNNING).set(0.0);
    for kind in [StageKind::Shuffle, StageKind::Table] {
        let kind = kind.as_str();
        for name in [ROWS_WRITTEN, BYTES_WRITTEN, ROWS_READ, BYTES_READ] {
            counter!(name, "stage_kind" => kind).absolute(0);
        }
    }
    counter!(SHUFFLE_BYTES).absolute(0);
    for table in ["built", "shared"] {
        counter!(BROADCAST_JOINS, "table" => table).absolute(0);
    }
    counter!(TASK_REDELIVERIES).absolute(0);
    counter!(LEASE_RENEWAL_FAILURES).absolute(0);
}

/// Last known state of each job this process runs, so the per-state gauge moves one job
/// from one state to the next.
static JOB_STATES: LazyLock<Mutex<HashMap<String, JobState>>> = LazyLock::new(Mutex::default);

fn live_state_label(state: JobState) -> Option<&'static str> {
    (!state.is_terminal()).then(|| state.as_str())
}

/// A job of this coordinator moved to `state`. Called where job state is stored, so every
/// transition is seen once; a job that ends leaves the gauge.
pub fn job_state_changed(job: &str, state: JobState) {
    let mut states = JOB_STATES.lock().expect("job states lock");
    let previous = match live_state_label(state) {
        Some(_) => states.insert(job.to_string(), state),
        None => states.remove(job),
    };
    if previous == Some(state) {
        return;
    }
    if let Some(label) = previous.and_then(live_state_label) {
        gauge!(JOBS, "state" => label).decrement(1.0);
    }
    if let Some(label) = live_state_label(state) {
        gauge!(JOBS, "state" => label).increment(1.0);
    }
}

/// A job ended on this coordinator: `succeeded`, `failed`, `cancelled` or `invalid`.
pub fn job_finished(outcome: &str) {
    let outcome = match outcome {
        "succeeded" => "succeeded",
        "cancelled" => "cancelled",
        "invalid" => "invalid",
        _ => "failed",
    };
    counter!(JOBS_FINISHED, "outcome" => outcome).increment(1);
}

/// The coordinator accepted `n` more task outputs.
pub fn tasks_completed(n: u64) {
    counter!(TASKS_COMPLETED).increment(n);
}

/// A task message was published for `attempt` (1 is the first).
pub fn task_published(attempt: u32) {
    if attempt > 1 {
        counter!(TASK_RETRIES).increment(1);
    } else {
        counter!(TASKS_PUBLISHED).increment(1);
    }
}

/// The coordinator found the lease of a running attempt expired.
pub fn lease_expired() {
    counter!(LEASE_EXPIRIES).increment(1);
}

/// The coordinator received a dead-lettered task.
pub fn task_dead_lettered() {
    counter!(TASKS_DEAD_LETTERED).increment(1);
}

/// The coordinator sampled `queue` (`tasks`, `jobs`, `dead`).
pub fn queue_sampled(queue: &'static str, messages: u32, consumers: u32) {
    gauge!(QUEUE_MESSAGES, "queue" => queue).set(f64::from(messages));
    gauge!(QUEUE_CONSUMERS, "queue" => queue).set(f64::from(consumers));
}

/// A commit ended after `elapsed`: `outcome` is `committed`, `already_committed`, `empty`
/// or `failed`; `conflicts` is how many attempts lost the compare-and-swap on the way.
pub fn commit_finished(mode: &str, outcome: &'static str, elapsed: Duration, conflicts: u64) {
    let mode = match mode {
        "overwrite" => "overwrite",
        "overwrite_partitions" => "overwrite_partitions",
        _ => "append",
    };
    histogram!(COMMIT_DURATION, "mode" => mode, "outcome" => outcome).record(elapsed.as_secs_f64());
    if conflicts > 0 {
        counter!(COMMIT_CONFLICTS).increment(conflicts);
    }
}

/// One commit attempt lost the catalog's compare-and-swap (for code that sees each attempt).
pub fn commit_conflict() {
    counter!(COMMIT_CONFLICTS).increment(1);
}

/// A job API call answered with `code` (a gRPC code name) after `elapsed`.
pub fn api_call(method: &str, code: &'static str, elapsed: Duration) {
    let method = api_method_label(method);
    counter!(API_REQUESTS, "method" => method, "code" => code).increment(1);
    histogram!(API_DURATION, "method" => method).record(elapsed.as_secs_f64());
}

/// The method name of a gRPC path (`/nightshift.v1.JobService/SubmitJob` → `SubmitJob`), or
/// `other` for paths outside the known services, so a client cannot create series at will.
fn api_method_label(path: &str) -> &'static str {
    const METHODS: &[&str] = &[
        "SubmitJob",
        "GetJob",
        "WatchJob",
        "CancelJob",
        "ListJobs",
        "Check",
        "Watch",
        "ServerReflectionInfo",
    ];
    let method = path.rsplit('/').next().unwrap_or_default();
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

/// A worker started a task; `redelivered` if the message came before.
pub fn task_started(redelivered: bool) {
    gauge!(TASKS_RUNNING).increment(1.0);
    if redelivered {
        counter!(TASK_REDELIVERIES).increment(1);
    }
}

/// What a finished task did, as the worker saw it.
#[derive(Debug, Clone, Copy)]
pub struct TaskFigures {
    pub kind: StageKind,
    pub outcome: TaskOutcome,
    pub elapsed: Duration,
    pub rows_written: u64,
    pub bytes_written: u64,
}

/// A worker finished (or skipped) a task.
pub fn task_finished(figures: TaskFigures) {
    let kind = figures.kind.as_str();
    gauge!(TASKS_RUNNING).decrement(1.0);
    counter!(TASKS_FINISHED, "stage_kind" => kind, "outcome" => figures.outcome.as_str())
        .increment(1);
    histogram!(TASK_DURATION, "stage_kind" => kind).record(figures.elapsed.as_secs_f64());
    counter!(ROWS_WRITTEN, "stage_kind" => kind).increment(figures.rows_written);
    counter!(BYTES_WRITTEN, "stage_kind" => kind).increment(figures.bytes_written);
    if figures.kind == StageKind::Shuffle {
        counter!(SHUFFLE_BYTES).increment(figures.bytes_written);
    }
}

/// A task that was running was abandoned (a drain that ran out of time): it leaves the
/// running gauge without counting as finished.
pub fn task_abandoned() {
    gauge!(TASKS_RUNNING).decrement(1.0);
}

/// Rows and bytes a task read (its scans and shuffle reads).
pub fn task_read(kind: StageKind, rows: u64, bytes: u64) {
    let kind = kind.as_str();
    counter!(ROWS_READ, "stage_kind" => kind).increment(rows);
    counter!(BYTES_READ, "stage_kind" => kind).increment(bytes);
}

/// A task ran a broadcast join on a table it built, or on one an earlier task of its stage
/// built in this process (`shared`).
pub fn broadcast_join(shared: bool) {
    let table = if shared { "shared" } else { "built" };
    counter!(BROADCAST_JOINS, "table" => table).increment(1);
}

/// A worker could not renew a task lease.
pub fn lease_renewal_failed() {
    counter!(LEASE_RENEWAL_FAILURES).increment(1);
}

/// A worker stopped gracefully.
pub fn drained(outcome: DrainOutcome) {
    counter!(DRAINS, "outcome" => outcome.as_str()).increment(1);
}

/// The readiness check of `dependency` (`rabbitmq`, `redis`, `object_store`, `catalog`) passed or not.
pub fn dependency_checked(dependency: &'static str, up: bool) {
    gauge!(DEPENDENCY_UP, "dependency" => dependency).set(if up { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_methods_outside_the_services_share_one_label() {
        assert_eq!(
            api_method_label("/nightshift.v1.JobService/SubmitJob"),
            "SubmitJob"
        );
        assert_eq!(api_method_label("/grpc.health.v1.Health/Check"), "Check");
        assert_eq!(api_method_label("/x/AnythingAClientSends"), "other");
    }

    #[test]
    fn a_job_moves_between_states_once() {
        // Without a recorder the calls are no-ops; the bookkeeping is what is checked.
        job_state_changed("j-metrics", JobState::Running);
        job_state_changed("j-metrics", JobState::Running);
        job_state_changed("j-metrics", JobState::Committing);
        assert_eq!(
            JOB_STATES.lock().unwrap().get("j-metrics"),
            Some(&JobState::Committing)
        );
        job_state_changed("j-metrics", JobState::Succeeded);
        job_state_changed("j-metrics", JobState::Failed);
        assert!(!JOB_STATES.lock().unwrap().contains_key("j-metrics"));
    }
}
