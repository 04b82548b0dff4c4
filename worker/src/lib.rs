//! The worker: takes tasks from the [`TaskQueue`], runs them with
//! [`run_task`](nightshift_core::task::run_task) and publishes their results.
//!
//! Architecture invariant: a task is acked only after its output is written and its result
//! is published, so a worker that dies mid-task leaves the task to be delivered again.

use std::sync::Arc;

use datafusion::prelude::SessionContext;
use nightshift_core::Result;
use nightshift_core::ids::{JobId, StageId, TaskKey};
use nightshift_core::session::{SessionOptions, new_session};
use nightshift_core::task::run_task;
use nightshift_core::transport::{JobState, StateStore, TaskQueue};
use nightshift_proto::PROTOCOL_VERSION;
use nightshift_proto::v1::{self, task_result};
use prost::Message;
use tracing::{debug, info, warn};

/// A worker's identity and engine.
pub struct Worker {
    pub id: String,
    queue: Arc<dyn TaskQueue>,
    state: Arc<dyn StateStore>,
    session: SessionContext,
    lease_ttl: std::time::Duration,
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

    /// Consumes tasks until the queue closes.
    pub async fn run(&self) -> Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// Consumes tasks until the queue closes or `shutdown` completes. A shutdown (SIGTERM on
    /// scale-down) is taken between tasks: the running task finishes and is acked first.
    pub async fn run_until(&self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        info!(worker = %self.id, "worker started");
        tokio::pin!(shutdown);
        loop {
            let delivery = tokio::select! {
                biased;
                () = &mut shutdown => {
                    info!(worker = %self.id, "shutdown requested; worker stopping");
                    return Ok(());
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
            let result = self.run_one(&task).await;
            match JobId::parse(&task.job_id) {
                Ok(job) => {
                    self.queue
                        .publish_result(&job, result.encode_to_vec().into())
                        .await?
                }
                Err(e) => warn!(worker = %self.id, error = %e, "task with a bad job id dropped"),
            }
            delivery.ack().await?;
        }
        debug!(worker = %self.id, "task queue closed; worker stopping");
        Ok(())
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
        if test_crash_stage() == Some(task.stage_id) {
            tracing::error!(worker = %self.id, stage = task.stage_id, "NIGHTSHIFT_TEST_CRASH_ON_STAGE: aborting");
            std::process::abort();
        }
        let result = tokio::select! {
            result = self.run_one_inner(task) => result,
            () = self.heartbeat(task) => unreachable!("the heartbeat never ends"),
        };
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

    /// Renews the task's lease every third of its time to live, for as long as it runs.
    async fn heartbeat(&self, task: &v1::TaskDefinition) {
        let Ok(job) = JobId::parse(&task.job_id) else {
            return std::future::pending().await;
        };
        let key = TaskKey {
            stage: StageId(task.stage_id),
            partition: task.partition,
        };
        loop {
            if let Err(e) = self
                .state
                .renew_lease(&job, key, task.attempt, &self.id, self.lease_ttl)
                .await
            {
                warn!(worker = %self.id, error = %e, "cannot renew the task lease");
            }
            tokio::time::sleep(self.lease_ttl / 3).await;
        }
    }

    async fn run_one_inner(&self, task: &v1::TaskDefinition) -> v1::TaskResult {
        if let Some(delay) = test_task_delay() {
            tokio::time::sleep(delay).await;
        }
        if self.job_has_ended(&task.job_id).await {
            debug!(job_id = %task.job_id, stage = task.stage_id, task = task.partition, "job has ended; task skipped");
            return v1::TaskResult {
                protocol_version: PROTOCOL_VERSION,
                job_id: task.job_id.clone(),
                stage_id: task.stage_id,
                partition: task.partition,
                attempt: task.attempt,
                worker_id: self.id.clone(),
                outcome: Some(task_result::Outcome::Failed(v1::TaskFailed {
                    message: "skipped: the job has already ended".into(),
                    retryable: false,
                })),
                ..Default::default()
            };
        }
        run_task(task, &self.session, &self.id).await
    }

    /// A task of a job that has failed (or succeeded, for a duplicate delivery) is not run.
    async fn job_has_ended(&self, job_id: &str) -> bool {
        let Ok(job) = JobId::parse(job_id) else {
            return false;
        };
        matches!(
            self.state.job_state(&job).await,
            Ok(Some((JobState::Failed | JobState::Succeeded, _)))
        )
    }
}

/// Fault injection for tests: `NIGHTSHIFT_TEST_TASK_DELAY_MS` slows every task down, so a
/// test can kill a worker or the coordinator while tasks are running.
fn test_task_delay() -> Option<std::time::Duration> {
    std::env::var("NIGHTSHIFT_TEST_TASK_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis)
}

/// Fault injection for tests: `NIGHTSHIFT_TEST_CRASH_ON_STAGE=N` makes the worker process
/// die (abort) when it takes a task of stage N, like an out-of-memory kill would.
fn test_crash_stage() -> Option<u32> {
    std::env::var("NIGHTSHIFT_TEST_CRASH_ON_STAGE")
        .ok()
        .and_then(|v| v.parse().ok())
}
