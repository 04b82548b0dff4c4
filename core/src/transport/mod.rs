//! Transport seams between the coordinator and the workers.
//!
//! [`TaskQueue`] carries task definitions to workers and results back; [`StateStore`] keeps
//! job state and the first-result-wins record of task outputs. The embedded mode uses the
//! in-process versions in [`memory`]; the cluster mode plugs in RabbitMQ and Redis behind
//! the same traits without touching planner, task or commit code.

pub mod memory;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::ids::{JobId, TaskKey};

/// One message taken from a queue. It stays owned by the consumer until acked or nacked.
#[async_trait]
pub trait Delivery: Send {
    fn payload(&self) -> &[u8];
    /// How many times this message was delivered before (0 on first delivery).
    fn redeliveries(&self) -> u32;
    /// Done with the message. Architecture invariant: a worker acks a task only after its
    /// output is durable and its result is published.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// Give the message back (`requeue`) or drop it.
    async fn nack(self: Box<Self>, requeue: bool) -> Result<()>;
}

/// Tasks to workers, results back to the coordinator, one result channel per job.
#[async_trait]
pub trait TaskQueue: Send + Sync {
    async fn publish_task(&self, task: Bytes) -> Result<()>;
    /// Publishes several tasks; a transport that can overlap their confirms does.
    async fn publish_tasks(&self, tasks: Vec<Bytes>) -> Result<()> {
        for task in tasks {
            self.publish_task(task).await?;
        }
        Ok(())
    }
    /// The next task, or `None` once the queue is closed.
    async fn next_task(&self) -> Result<Option<Box<dyn Delivery>>>;
    /// Creates the result channel of `job` if it does not exist (a restarted coordinator
    /// finds the results published while it was away).
    async fn open_results(&self, job: &JobId) -> Result<()>;
    async fn publish_result(&self, job: &JobId, result: Bytes) -> Result<()>;
    /// The next result of `job`, or `None` once the queue is closed.
    async fn next_result(&self, job: &JobId) -> Result<Option<Box<dyn Delivery>>>;
    /// Deletes the result channel of a finished job.
    async fn close_results(&self, job: &JobId) -> Result<()>;
}

/// Where a job is in its life: the one domain type, stored by the [`StateStore`] and
/// converted to the API's enum only at the API edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted by the API, not yet taken by a coordinator.
    Queued,
    Running,
    /// Every task is done; the snapshot is being committed.
    Committing,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Committing,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Committing => "committing",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The job has ended; nothing will change it again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// A task output reported in this state can never be part of the job's snapshot: the
    /// coordinator has taken every winner (committing) or the job has ended. A worker that
    /// finishes a task in such a state deletes what it wrote instead of reporting it.
    pub fn refuses_task_output(self) -> bool {
        self == JobState::Committing || self.is_terminal()
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Job and task state.
#[async_trait]
pub trait StateStore: Send + Sync {
    async fn set_job_state(&self, job: &JobId, state: JobState, detail: &str) -> Result<()>;
    async fn job_state(&self, job: &JobId) -> Result<Option<(JobState, String)>>;
    /// Records `result` as the output of `task` unless another attempt's is recorded already.
    /// Returns whether this one won; a loser's output must be discarded.
    async fn claim_task_output(&self, job: &JobId, task: TaskKey, result: Bytes) -> Result<bool>;
    /// Every recorded task output of `job`.
    async fn task_outputs(&self, job: &JobId) -> Result<Vec<(TaskKey, Bytes)>>;
    /// Forgets the recorded outputs of `tasks` of `job` (outputs of another plan of the job,
    /// which are never reused), so this plan's results can claim them.
    async fn forget_task_outputs(&self, job: &JobId, tasks: &[TaskKey]) -> Result<()>;
    /// Forgets everything about `job` except its final state.
    async fn clear_task_outputs(&self, job: &JobId) -> Result<()>;
    /// Records that `worker` runs `attempt` of `task` for the next `ttl`; renewed by the
    /// worker's heartbeat while the task runs.
    async fn renew_lease(
        &self,
        job: &JobId,
        task: TaskKey,
        attempt: u32,
        worker: &str,
        ttl: std::time::Duration,
    ) -> Result<()>;
    /// The attempt holding a live lease on `task`, if any.
    async fn lease(&self, job: &JobId, task: TaskKey) -> Result<Option<u32>>;
    /// The next attempt number of each of `tasks`, from a counter that survives coordinator
    /// restarts: a result can always be told apart from a later attempt's.
    async fn next_attempts(&self, job: &JobId, tasks: &[TaskKey]) -> Result<Vec<u32>>;
    /// Makes `owner` the one coordinator running `job` for `ttl` (taken when free or already
    /// ours, renewed by calling again). Returns whether `owner` holds it.
    async fn acquire_job(&self, job: &JobId, owner: &str, ttl: std::time::Duration)
    -> Result<bool>;
    /// Gives up `owner`'s hold on `job` (no-op if another owner holds it).
    async fn release_job(&self, job: &JobId, owner: &str) -> Result<()>;
    /// Records that `job`'s files in `table` are to be swept again at `due_ms` (Unix
    /// milliseconds), for late writers that outlived the job.
    async fn schedule_sweep(&self, job: &JobId, table: &str, due_ms: i64) -> Result<()>;
    /// Sweeps due at `now_ms`: (job, table).
    async fn due_sweeps(&self, now_ms: i64) -> Result<Vec<(JobId, String)>>;
    /// Forgets a sweep once done.
    async fn sweep_done(&self, job: &JobId) -> Result<()>;
    /// Asks the coordinator running `job` to stop it.
    async fn request_cancel(&self, job: &JobId) -> Result<()>;
    /// Whether someone asked to stop `job`.
    async fn cancel_requested(&self, job: &JobId) -> Result<bool>;
}
