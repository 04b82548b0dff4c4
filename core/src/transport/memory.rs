//! In-process transports for the embedded mode and tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_channel::{Receiver, Sender};
use async_trait::async_trait;
use bytes::Bytes;

use super::{Delivery, JobState, StateStore, TaskQueue};
use crate::error::{CoreError, Result};
use crate::ids::{JobId, TaskKey};

/// A message and how many times it was delivered before.
type Message = (Bytes, u32);
type Channel = (Sender<Message>, Receiver<Message>);

/// A task queue over in-process channels. Nacked messages go to the back of the queue.
#[derive(Debug)]
pub struct MemoryQueue {
    tasks: Channel,
    results: Mutex<HashMap<JobId, Channel>>,
    /// Jobs whose result channel was closed: a result published for them is returned, as
    /// RabbitMQ returns a message for a deleted queue.
    closed: Mutex<std::collections::HashSet<JobId>>,
}

impl Default for MemoryQueue {
    fn default() -> Self {
        MemoryQueue {
            tasks: async_channel::unbounded(),
            results: Mutex::new(HashMap::new()),
            closed: Mutex::new(std::collections::HashSet::new()),
        }
    }
}

impl MemoryQueue {
    /// Closes every channel: consumers see `None` once drained.
    pub fn close(&self) {
        self.tasks.0.close();
        for (sender, _) in self.results.lock().expect("queue lock").values() {
            sender.close();
        }
    }

    fn results_of(&self, job: &JobId) -> Channel {
        self.results
            .lock()
            .expect("queue lock")
            .entry(job.clone())
            .or_insert_with(async_channel::unbounded)
            .clone()
    }

    /// Tasks waiting for a worker.
    pub fn pending_tasks(&self) -> usize {
        self.tasks.1.len()
    }
}

struct MemoryDelivery {
    payload: Bytes,
    redeliveries: u32,
    requeue_to: Sender<(Bytes, u32)>,
}

#[async_trait]
impl Delivery for MemoryDelivery {
    fn payload(&self) -> &[u8] {
        &self.payload
    }

    fn redeliveries(&self) -> u32 {
        self.redeliveries
    }

    async fn ack(self: Box<Self>) -> Result<()> {
        Ok(())
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<()> {
        if requeue {
            send(&self.requeue_to, self.payload, self.redeliveries + 1).await?;
        }
        Ok(())
    }
}

async fn send(to: &Sender<(Bytes, u32)>, payload: Bytes, redeliveries: u32) -> Result<()> {
    to.send((payload, redeliveries))
        .await
        .map_err(|_| CoreError::Transport("in-process queue is closed".into()))
}

async fn receive(
    from: &Receiver<(Bytes, u32)>,
    requeue_to: &Sender<(Bytes, u32)>,
) -> Option<Box<dyn Delivery>> {
    let (payload, redeliveries) = from.recv().await.ok()?;
    Some(Box::new(MemoryDelivery {
        payload,
        redeliveries,
        requeue_to: requeue_to.clone(),
    }))
}

#[async_trait]
impl TaskQueue for MemoryQueue {
    async fn publish_task(&self, task: Bytes) -> Result<()> {
        send(&self.tasks.0, task, 0).await
    }

    async fn next_task(&self) -> Result<Option<Box<dyn Delivery>>> {
        Ok(receive(&self.tasks.1, &self.tasks.0).await)
    }

    async fn open_results(&self, job: &JobId) -> Result<()> {
        self.closed.lock().expect("queue lock").remove(job);
        self.results_of(job);
        Ok(())
    }

    async fn publish_result(&self, job: &JobId, result: Bytes) -> Result<()> {
        if self.closed.lock().expect("queue lock").contains(job) {
            return Err(CoreError::Unroutable {
                queue: format!("results of {job}"),
            });
        }
        send(&self.results_of(job).0, result, 0).await
    }

    async fn next_result(&self, job: &JobId) -> Result<Option<Box<dyn Delivery>>> {
        let (sender, receiver) = self.results_of(job);
        Ok(receive(&receiver, &sender).await)
    }

    async fn close_results(&self, job: &JobId) -> Result<()> {
        self.closed.lock().expect("queue lock").insert(job.clone());
        if let Some((sender, _)) = self.results.lock().expect("queue lock").remove(job) {
            sender.close();
        }
        Ok(())
    }
}

/// Job and task state in a mutex-guarded map.
#[derive(Debug, Default)]
pub struct MemoryState {
    jobs: Mutex<HashMap<JobId, (JobState, String)>>,
    outputs: Mutex<HashMap<JobId, BTreeMap<TaskKey, Bytes>>>,
    leases: Mutex<HashMap<(JobId, TaskKey), (u32, std::time::Instant)>>,
    /// Leases last until the job's outputs are cleared, whatever their time to live.
    leases_never_expire: bool,
    cancelled: Mutex<std::collections::HashSet<JobId>>,
    attempts: Mutex<HashMap<(JobId, TaskKey), u32>>,
    owners: Mutex<HashMap<JobId, (String, std::time::Instant)>>,
    sweeps: Mutex<HashMap<JobId, (String, i64)>>,
}

impl MemoryState {
    /// State for workers that live and die with the process that holds it (the embedded
    /// run). A lease there cannot outlive its worker, so it never expires: a task whose
    /// thread is busy for longer than the lease (a large in-memory sort) is not taken for
    /// a dead worker's.
    pub fn for_one_process() -> Self {
        Self {
            leases_never_expire: true,
            ..Self::default()
        }
    }
}

#[async_trait]
impl StateStore for MemoryState {
    async fn set_job_state(&self, job: &JobId, state: JobState, detail: &str) -> Result<()> {
        self.jobs
            .lock()
            .expect("state lock")
            .insert(job.clone(), (state, detail.to_string()));
        Ok(())
    }

    async fn job_state(&self, job: &JobId) -> Result<Option<(JobState, String)>> {
        Ok(self.jobs.lock().expect("state lock").get(job).cloned())
    }

    async fn claim_task_output(&self, job: &JobId, task: TaskKey, result: Bytes) -> Result<bool> {
        let mut outputs = self.outputs.lock().expect("state lock");
        let job_outputs = outputs.entry(job.clone()).or_default();
        if job_outputs.contains_key(&task) {
            return Ok(false);
        }
        job_outputs.insert(task, result);
        Ok(true)
    }

    async fn task_outputs(&self, job: &JobId) -> Result<Vec<(TaskKey, Bytes)>> {
        Ok(self
            .outputs
            .lock()
            .expect("state lock")
            .get(job)
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default())
    }

    async fn forget_task_outputs(&self, job: &JobId, tasks: &[TaskKey]) -> Result<()> {
        if let Some(outputs) = self.outputs.lock().expect("state lock").get_mut(job) {
            for task in tasks {
                outputs.remove(task);
            }
        }
        Ok(())
    }

    async fn clear_task_outputs(&self, job: &JobId) -> Result<()> {
        self.outputs.lock().expect("state lock").remove(job);
        self.leases
            .lock()
            .expect("state lock")
            .retain(|(j, _), _| j != job);
        self.attempts
            .lock()
            .expect("state lock")
            .retain(|(j, _), _| j != job);
        Ok(())
    }

    async fn renew_lease(
        &self,
        job: &JobId,
        task: TaskKey,
        attempt: u32,
        _worker: &str,
        ttl: std::time::Duration,
    ) -> Result<()> {
        self.leases.lock().expect("state lock").insert(
            (job.clone(), task),
            (attempt, std::time::Instant::now() + ttl),
        );
        Ok(())
    }

    async fn next_attempts(&self, job: &JobId, tasks: &[TaskKey]) -> Result<Vec<u32>> {
        let mut attempts = self.attempts.lock().expect("state lock");
        Ok(tasks
            .iter()
            .map(|task| {
                let n = attempts.entry((job.clone(), *task)).or_default();
                *n += 1;
                *n
            })
            .collect())
    }

    async fn acquire_job(
        &self,
        job: &JobId,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<bool> {
        let now = std::time::Instant::now();
        let mut owners = self.owners.lock().expect("state lock");
        let free = owners
            .get(job)
            .is_none_or(|(holder, until)| holder == owner || *until <= now);
        if free {
            owners.insert(job.clone(), (owner.to_string(), now + ttl));
        }
        Ok(free)
    }

    async fn release_job(&self, job: &JobId, owner: &str) -> Result<()> {
        let mut owners = self.owners.lock().expect("state lock");
        if owners.get(job).is_some_and(|(holder, _)| holder == owner) {
            owners.remove(job);
        }
        Ok(())
    }

    async fn schedule_sweep(&self, job: &JobId, table: &str, due_ms: i64) -> Result<()> {
        self.sweeps
            .lock()
            .expect("state lock")
            .insert(job.clone(), (table.to_string(), due_ms));
        Ok(())
    }

    async fn due_sweeps(&self, now_ms: i64) -> Result<Vec<(JobId, String)>> {
        Ok(self
            .sweeps
            .lock()
            .expect("state lock")
            .iter()
            .filter(|(_, (_, due))| *due <= now_ms)
            .map(|(job, (table, _))| (job.clone(), table.clone()))
            .collect())
    }

    async fn sweep_done(&self, job: &JobId) -> Result<()> {
        self.sweeps.lock().expect("state lock").remove(job);
        Ok(())
    }

    async fn request_cancel(&self, job: &JobId) -> Result<()> {
        self.cancelled
            .lock()
            .expect("state lock")
            .insert(job.clone());
        Ok(())
    }

    async fn cancel_requested(&self, job: &JobId) -> Result<bool> {
        Ok(self.cancelled.lock().expect("state lock").contains(job))
    }

    async fn lease(&self, job: &JobId, task: TaskKey) -> Result<Option<u32>> {
        Ok(self
            .leases
            .lock()
            .expect("state lock")
            .get(&(job.clone(), task))
            .filter(|(_, until)| self.leases_never_expire || *until > std::time::Instant::now())
            .map(|(attempt, _)| *attempt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::StageId;
    use std::time::Duration;

    const TASK: TaskKey = TaskKey {
        stage: StageId(1),
        partition: 0,
    };

    async fn lease_after_its_ttl(state: &MemoryState) -> Option<u32> {
        let job = JobId::parse("job-1").unwrap();
        state
            .renew_lease(&job, TASK, 2, "w", Duration::ZERO)
            .await
            .unwrap();
        state.lease(&job, TASK).await.unwrap()
    }

    #[tokio::test]
    async fn a_lease_expires_after_its_ttl_where_workers_are_other_processes() {
        assert_eq!(lease_after_its_ttl(&MemoryState::default()).await, None);
    }

    #[tokio::test]
    async fn a_lease_in_one_process_is_held_past_its_ttl_until_the_job_is_cleared() {
        let state = MemoryState::for_one_process();
        assert_eq!(lease_after_its_ttl(&state).await, Some(2));
        let job = JobId::parse("job-1").unwrap();
        state.clear_task_outputs(&job).await.unwrap();
        assert_eq!(state.lease(&job, TASK).await.unwrap(), None);
    }
}
