//! The worker: takes tasks from the [`TaskQueue`], runs them with
//! [`run_task`](nightshift_core::task::run_task) and publishes their results.
//!
//! Architecture invariant: a task is acked only after its output is written and its result
//! is published, so a worker that dies mid-task leaves the task to be delivered again. A
//! worker told to stop (SIGTERM) finishes its task within a grace period or nacks it back
//! to the queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::prelude::SessionContext;
use futures::FutureExt;
use nightshift_core::ids::{JobId, StageId, TaskKey};
use nightshift_core::metrics::{self, DrainOutcome, StageKind, TaskFigures, TaskOutcome};
use nightshift_core::session::{SessionOptions, new_session};
use nightshift_core::task::{discard_output, run_task};
use nightshift_core::transport::{StateStore, TaskQueue};
use nightshift_core::{CoreError, Result};
use nightshift_proto::v1::{self, task_definition, task_result};
use prost::Message;
use tracing::{Instrument, debug, info, info_span, warn};

/// What a worker calls when it starts a graceful stop, to stop the broker delivering it
/// more tasks (the RabbitMQ queue cancels its consumer).
pub type StopConsuming = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Default time a stopping worker gives its running task before handing it back.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(25);

/// What one graceful stop of a worker did, from what each of its lanes did: a task handed
/// back outweighs a task finished, which outweighs an idle lane; `None` when no lane was
/// stopped (the queue closed).
fn worker_drain(lanes: &[DrainOutcome]) -> Option<DrainOutcome> {
    [
        DrainOutcome::Requeued,
        DrainOutcome::Finished,
        DrainOutcome::Idle,
    ]
    .into_iter()
    .find(|outcome| lanes.contains(outcome))
}

/// A worker's identity and engine.
#[derive(Clone)]
pub struct Worker {
    pub id: String,
    queue: Arc<dyn TaskQueue>,
    state: Arc<dyn StateStore>,
    session: SessionContext,
    lease_ttl: std::time::Duration,
    drain_grace: Duration,
    stop_consuming: Option<StopConsuming>,
    lanes: usize,
}

impl Worker {
    pub fn new(
        id: impl Into<String>,
        queue: Arc<dyn TaskQueue>,
        state: Arc<dyn StateStore>,
    ) -> Self {
        Worker {
            id: id.into(),
            queue,
            state,
            session: new_session(SessionOptions::default()),
            lease_ttl: std::time::Duration::from_secs(30),
            drain_grace: DEFAULT_DRAIN_GRACE,
            stop_consuming: None,
            lanes: 1,
        }
    }

    /// Runs tasks in `session` (built with the process's memory pool and spill directory by
    /// `nightshift_core::session`) instead of an unbounded default one.
    pub fn with_session(mut self, session: SessionContext) -> Self {
        self.session = session;
        self
    }

    /// Sets the task lease this worker renews (the coordinator's `lease_ttl`).
    pub fn with_lease_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Sets how a graceful stop goes: the running task gets `grace` to finish, and
    /// `stop_consuming` is called first so no other task arrives meanwhile.
    pub fn with_drain(mut self, grace: Duration, stop_consuming: StopConsuming) -> Self {
        self.drain_grace = grace;
        self.stop_consuming = Some(stop_consuming);
        self
    }

    /// Runs up to `lanes` tasks at once (the tasks the broker lets this worker hold: its
    /// prefetch). Near-empty tasks spend most of their time waiting for the broker, and
    /// lanes overlap those waits; the memory limit is shared by the lanes' tasks.
    pub fn with_lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes.max(1);
        self
    }

    /// Consumes tasks until the queue closes.
    pub async fn run(&self) -> Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// Consumes tasks until the queue closes or `shutdown` completes (SIGTERM on
    /// scale-down). Then the worker drains: it stops consuming, gives the running task the
    /// grace period to finish (its result is published and the task acked as usual), and
    /// otherwise hands the task back to the queue (nack with requeue) for another worker.
    /// Either way it returns `Ok`: no task is lost.
    ///
    /// With several lanes each runs this loop on the one consumer, as a tokio task of its
    /// own (so their tasks run on different cores); a stop reaches them all. A lane that
    /// fails stops the others: their unacked tasks go back to the queue.
    pub async fn run_until(
        &self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        info!(worker = %self.id, lanes = self.lanes, "worker started");
        let shutdown = shutdown.shared();
        let mut lanes = tokio::task::JoinSet::new();
        for _ in 0..self.lanes {
            let worker = self.clone();
            let shutdown = shutdown.clone();
            lanes.spawn(async move { worker.lane(shutdown).await });
        }
        let mut stopped = Vec::new();
        while let Some(lane) = lanes.join_next().await {
            let ended = lane.map_err(|e| CoreError::Transport(format!("worker lane: {e}")));
            match ended.and_then(|r| r) {
                Ok(Some(outcome)) => stopped.push(outcome),
                Ok(None) => {}
                Err(e) => {
                    lanes.abort_all();
                    return Err(e);
                }
            }
        }
        // One stop of the worker, however many lanes it had.
        if let Some(outcome) = worker_drain(&stopped) {
            if outcome == DrainOutcome::Idle {
                info!(worker = %self.id, "shutdown requested; no task running; worker stopping");
            }
            metrics::drained(outcome);
        }
        Ok(())
    }

    /// One task after another until the queue closes (`None`) or `shutdown` completes (what
    /// the stop did with this lane's running task).
    async fn lane(
        &self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<Option<DrainOutcome>> {
        tokio::pin!(shutdown);
        loop {
            let delivery = tokio::select! {
                biased;
                () = &mut shutdown => {
                    self.begin_drain().await;
                    return Ok(Some(DrainOutcome::Idle));
                }
                next = self.queue.next_task() => next?,
            };
            let Some(delivery) = delivery else { break };
            let task = match v1::TaskDefinition::decode(delivery.payload()) {
                Ok(task) => task,
                Err(e) => {
                    warn!(worker = %self.id, error = %e, "undecodable task dropped");
                    delivery.nack(false).await?;
                    continue;
                }
            };
            // Every line logged while the task runs carries its job, stage, task and attempt.
            let span = info_span!(
                "task",
                job_id = %task.job_id,
                stage = task.stage_id,
                task = task.partition,
                attempt = task.attempt,
            );
            metrics::task_started(delivery.redeliveries() > 0);
            let started = Instant::now();
            let run = self.run_one(&task).instrument(span.clone());
            tokio::pin!(run);
            let mut draining = false;
            let result = tokio::select! {
                biased;
                result = &mut run => result,
                () = &mut shutdown => {
                    draining = true;
                    self.begin_drain().await;
                    info!(parent: &span, worker = %self.id, grace_secs = self.drain_grace.as_secs_f64(),
                        "shutdown requested; finishing the running task");
                    match tokio::time::timeout(self.drain_grace, &mut run).await {
                        Ok(result) => result,
                        Err(_) => {
                            warn!(parent: &span, worker = %self.id,
                                "grace period over; task handed back to the queue; worker stopping");
                            metrics::task_abandoned();
                            delivery.nack(true).await?;
                            return Ok(Some(DrainOutcome::Requeued));
                        }
                    }
                }
            };
            metrics::task_finished(task_figures(&task, &result, started.elapsed()));
            // A task that has written its output but is slow to report it, for tests.
            #[cfg(feature = "failpoints")]
            if let Some(Some(ms)) = fail::eval("worker-report-delay", |ms| {
                ms.and_then(|ms| ms.parse().ok())
            }) {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            self.report(&task, result).await?;
            delivery.ack().await?;
            if draining {
                info!(parent: &span, worker = %self.id, "running task finished and acked; worker stopping");
                return Ok(Some(DrainOutcome::Finished));
            }
        }
        debug!(worker = %self.id, "task queue closed; worker stopping");
        Ok(None)
    }

    /// Publishes a task's result. If the job has ended (or is committing) meanwhile, no
    /// coordinator takes the output any more: what the task wrote is deleted here (it can
    /// never be part of the job's snapshot, whose winners were all taken before it
    /// committed), and a failure saying so is reported instead, so a coordinator draining
    /// the job's running tasks stops waiting for this one.
    async fn report(&self, task: &v1::TaskDefinition, mut result: v1::TaskResult) -> Result<()> {
        let Ok(job) = JobId::parse(&task.job_id) else {
            warn!(worker = %self.id, job_id = %task.job_id, "task with a bad job id dropped");
            return Ok(());
        };
        let wrote = matches!(
            result.outcome,
            Some(task_result::Outcome::Shuffle(_) | task_result::Outcome::Files(_))
        );
        if wrote && self.job_refuses_output(&job).await {
            let why = "the job ended while the task ran";
            self.discard(task, &result, why).await;
            result.outcome = Some(task_result::Outcome::Failed(v1::TaskFailed {
                message: format!("{why}; its output was deleted"),
                // Should a coordinator still want this task, it runs it again.
                retryable: true,
            }));
        }
        match self
            .queue
            .publish_result(&job, result.encode_to_vec().into())
            .await
        {
            Ok(()) => {
                // A worker killed between publishing and acking: the broker delivers the
                // task again, and it runs twice.
                #[cfg(feature = "failpoints")]
                if fail::eval("worker-crash-after-publish", |_| ()).is_some() {
                    tracing::error!(worker = %self.id, "failpoint worker-crash-after-publish: aborting");
                    std::process::abort();
                }
                Ok(())
            }
            // The job's result queue is gone: the job has ended.
            Err(CoreError::Unroutable { .. }) => {
                self.discard(task, &result, "the job's result queue is gone")
                    .await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn discard(&self, task: &v1::TaskDefinition, result: &v1::TaskResult, why: &str) {
        match discard_output(result).await {
            Ok(deleted) => info!(
                worker = %self.id,
                job_id = %task.job_id,
                stage = task.stage_id,
                task = task.partition,
                attempt = task.attempt,
                deleted,
                "{why}; the task's output was deleted"
            ),
            Err(e) => warn!(
                worker = %self.id,
                job_id = %task.job_id,
                error = %e,
                "{why}; cannot delete the task's output (the job's late sweep will)"
            ),
        }
    }

    /// First step of a graceful stop: nothing more is delivered to this worker.
    async fn begin_drain(&self) {
        if let Some(stop) = &self.stop_consuming {
            stop().await;
        }
    }

    async fn run_one(&self, task: &v1::TaskDefinition) -> v1::TaskResult {
        info!(
            worker = %self.id,
            job_id = %task.job_id,
            stage = task.stage_id,
            task = task.partition,
            attempt = task.attempt,
            "task started"
        );
        #[cfg(feature = "failpoints")]
        if fail::eval("worker-crash-on-stage", |stage| {
            stage.as_deref() == Some(&task.stage_id.to_string())
        }) == Some(true)
        {
            tracing::error!(worker = %self.id, stage = task.stage_id, "failpoint worker-crash-on-stage: aborting");
            std::process::abort();
        }
        // A panic in the task's code (DataFusion's included) fails the task instead of
        // ending this lane unseen: the job would wait for its result forever.
        let run = std::panic::AssertUnwindSafe(self.run_one_inner(task));
        // The heartbeat is a task of its own, not a branch of the task's future: a step that
        // keeps this thread busy (a large sort) would starve it there, and the task would be
        // taken for a dead worker's. Dropping the set ends it.
        let mut heartbeat = tokio::task::JoinSet::new();
        heartbeat.spawn(renew_lease_while_running(
            self.state.clone(),
            self.id.clone(),
            self.lease_ttl,
            task.job_id.clone(),
            TaskKey {
                stage: StageId(task.stage_id),
                partition: task.partition,
            },
            task.attempt,
        ));
        // A task of a job that was cancelled or failed meanwhile stops (its output could
        // never be committed), so the worker is free for other jobs' tasks at once. Nothing
        // is deleted here: what the stopped attempt wrote is named as its own attempt's
        // (`names`), and only the job's late sweep removes it, deleting job-named files no
        // snapshot's manifest entry names, so no committed file can go.
        let result = tokio::select! {
            biased;
            outcome = futures::FutureExt::catch_unwind(run) => outcome.unwrap_or_else(|panic| {
                let message = format!("the task panicked: {}", panic_message(panic.as_ref()));
                tracing::error!(worker = %self.id, job_id = %task.job_id, stage = task.stage_id, task = task.partition, %message);
                failed_result(task, &self.id, message, false)
            }),
            () = self.until_job_ends(&task.job_id) => {
                info!(worker = %self.id, job_id = %task.job_id, stage = task.stage_id, task = task.partition,
                    "the job ended while the task ran; task stopped");
                failed_result(task, &self.id, STOPPED.into(), true)
            }
        };
        drop(heartbeat);
        info!(
            worker = %self.id,
            job_id = %task.job_id,
            stage = task.stage_id,
            task = task.partition,
            rows = result.rows,
            elapsed_ms = result.elapsed_ms,
            failed = matches!(result.outcome, Some(task_result::Outcome::Failed(_))),
            "task finished"
        );
        result
    }

    async fn run_one_inner(&self, task: &v1::TaskDefinition) -> v1::TaskResult {
        let ended = match JobId::parse(&task.job_id) {
            Ok(job) => self.job_refuses_output(&job).await,
            Err(_) => false,
        };
        if ended {
            debug!(job_id = %task.job_id, stage = task.stage_id, task = task.partition, "job has ended; task skipped");
            // Should a coordinator still want this task, it runs it again.
            return failed_result(task, &self.id, SKIPPED.into(), true);
        }
        // A slow task, for tests: the delay is part of the task's run.
        #[cfg(feature = "failpoints")]
        if let Some(Some(ms)) =
            fail::eval("worker-task-delay", |ms| ms.and_then(|ms| ms.parse().ok()))
        {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        // A step that keeps the thread busy (as a large sort does), for tests.
        #[cfg(feature = "failpoints")]
        if let Some(Some(ms)) = fail::eval("worker-task-hold-thread", |ms| {
            ms.and_then(|ms| ms.parse().ok())
        }) {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        #[cfg(feature = "failpoints")]
        fail::fail_point!("worker-task-panic", |_| panic!(
            "failpoint worker-task-panic"
        ));
        run_task(task, &self.session, &self.id).await
    }

    /// Returns once job `job_id` has ended or is committing, as seen every
    /// [`JOB_END_CHECK_EVERY`]; never for a job id that does not parse.
    async fn until_job_ends(&self, job_id: &str) {
        let Ok(job) = JobId::parse(job_id) else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(JOB_END_CHECK_EVERY).await;
            if self.job_refuses_output(&job).await {
                return;
            }
        }
    }

    /// Whether the job has ended or is committing: a task of it is not run (it is a
    /// duplicate or the job failed), and the output of a task that was running is not
    /// reported. An unreachable state store answers no: the result is published, and the
    /// coordinator sorts it out.
    async fn job_refuses_output(&self, job: &JobId) -> bool {
        matches!(
            self.state.job_state(job).await,
            Ok(Some((state, _))) if state.refuses_task_output()
        )
    }
}

/// The result of `task` failed on worker `worker` with `message`.
fn failed_result(
    task: &v1::TaskDefinition,
    worker: &str,
    message: String,
    retryable: bool,
) -> v1::TaskResult {
    v1::TaskResult {
        outcome: Some(task_result::Outcome::Failed(v1::TaskFailed {
            message,
            retryable,
        })),
        ..nightshift_core::task::result_of(task, worker)
    }
}

/// Renews the lease of `attempt` of task `key` every third of its time to live, until it is aborted.
async fn renew_lease_while_running(
    state: Arc<dyn StateStore>,
    worker: String,
    ttl: Duration,
    job: String,
    key: TaskKey,
    attempt: u32,
) {
    let Ok(job) = JobId::parse(&job) else {
        return;
    };
    loop {
        if let Err(e) = state.renew_lease(&job, key, attempt, &worker, ttl).await {
            metrics::lease_renewal_failed();
            warn!(%worker, error = %e, "cannot renew the task lease");
        }
        tokio::time::sleep(ttl / 3).await;
    }
}

/// What a panic said, if it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// The failure message of a task not run because its job had ended.
const SKIPPED: &str = "skipped: the job has already ended";

/// The failure message of a task stopped because its job ended while it ran.
const STOPPED: &str = "stopped: the job ended while the task ran";

/// How often a running task looks whether its job has ended (one Redis read).
const JOB_END_CHECK_EVERY: Duration = Duration::from_secs(2);

/// What a task did, for the metrics.
fn task_figures(
    task: &v1::TaskDefinition,
    result: &v1::TaskResult,
    elapsed: Duration,
) -> TaskFigures {
    let kind = match task.output {
        Some(task_definition::Output::Table(_)) => StageKind::Table,
        Some(task_definition::Output::Rows(_)) => StageKind::Check,
        _ => StageKind::Shuffle,
    };
    let outcome = match &result.outcome {
        Some(task_result::Outcome::Failed(f)) if f.message == SKIPPED || f.message == STOPPED => {
            TaskOutcome::Skipped
        }
        Some(task_result::Outcome::Failed(_)) | None => TaskOutcome::Failed,
        Some(_) => TaskOutcome::Succeeded,
    };
    TaskFigures {
        kind,
        outcome,
        elapsed,
        rows_written: result.rows,
        bytes_written: result.bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_drain_per_worker_whatever_its_lanes_did() {
        use DrainOutcome::{Finished, Idle, Requeued};
        assert_eq!(worker_drain(&[]), None);
        assert_eq!(worker_drain(&[Idle]), Some(Idle));
        assert_eq!(worker_drain(&[Idle, Idle, Idle]), Some(Idle));
        assert_eq!(worker_drain(&[Idle, Finished]), Some(Finished));
        assert_eq!(worker_drain(&[Finished, Requeued, Idle]), Some(Requeued));
    }
}
