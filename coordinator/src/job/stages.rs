//! The scheduling loop of one job: publish the tasks of ready stages, act on each result and
//! on expired leases, until every stage is complete or a task fails for good. Every decision
//! is the [`StageTracker`]'s; this module does the I/O around them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use nightshift_core::CoreError;
use nightshift_core::codec::encode_plan;
use nightshift_core::ids::{JobId, StageId, TaskKey};
use nightshift_core::names::stage_scratch_dir;
use nightshift_core::shuffle::resolve_shuffles;
use nightshift_core::transport::JobState;
use nightshift_proto::PROTOCOL_VERSION;
use nightshift_proto::v1::{self, task_definition};
use prost::Message;
use tracing::{debug, info, warn};

use super::ownership::Ownership;
use super::record::{TaskSpan, keep_span};
use super::{JobEnv, JobError, JobEvent};
use crate::scheduler::{LeaseVerdict, ResultVerdict, StageTracker, TaskFailure, task_key};

/// The loop's state: the tracker and what it needs to publish tasks.
pub(super) struct StageRunner<'a> {
    pub env: &'a JobEnv,
    pub job: &'a JobId,
    pub ownership: &'a Ownership,
    /// What the final stage's tasks produce: the table's data files, or a check's count.
    pub final_output: task_definition::Output,
    pub tracker: StageTracker,
    /// Every attempt's result as it arrived, for the job's report.
    pub timeline: Vec<TaskSpan>,
    /// When the job started (the timeline's zero).
    started: Instant,
    /// The plan of each started stage, resolved to its inputs (retries publish it again).
    stage_plans: BTreeMap<StageId, StagePlan>,
}

/// Segments a task's plan must be spared before it gets a plan of its own: below this the
/// shared plan is cheaper than encoding one per task.
const PRUNE_FROM_SEGMENTS: usize = 256;

/// A started stage's plan: whole, and encoded once for the tasks that need it whole.
struct StagePlan {
    resolved: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    encoded: Bytes,
}

impl StagePlan {
    /// The plan bytes the task of `partition` runs: the shared encoding, or one with only
    /// that partition's shuffle segments (`shuffle::for_partition`), so N tasks do not each
    /// carry and decode the segments of all N.
    fn for_task(&self, partition: usize) -> Result<Bytes, CoreError> {
        match nightshift_core::shuffle::for_partition(
            &self.resolved,
            partition,
            PRUNE_FROM_SEGMENTS,
        )? {
            Some(pruned) => Ok(encode_plan(pruned)?),
            None => Ok(self.encoded.clone()),
        }
    }
}

impl<'a> StageRunner<'a> {
    pub fn new(
        env: &'a JobEnv,
        job: &'a JobId,
        ownership: &'a Ownership,
        final_output: task_definition::Output,
        tracker: StageTracker,
        started: Instant,
    ) -> Self {
        StageRunner {
            env,
            job,
            ownership,
            final_output,
            tracker,
            timeline: Vec::new(),
            started,
            stage_plans: BTreeMap::new(),
        }
    }

    /// Keeps `result`'s span, judged `outcome`, in the timeline.
    fn record_span(&mut self, result: &v1::TaskResult, outcome: &str) {
        let received = self.started.elapsed().as_millis() as u64;
        keep_span(&mut self.timeline, TaskSpan::of(result, outcome, received));
    }

    /// Runs every stage to completion. On a task failure or a cancel, waits for the attempts
    /// still running (bounded), so that what they write is cleaned up with the rest.
    pub async fn run(
        &mut self,
        on_event: &(dyn Fn(JobEvent) + Send + Sync),
    ) -> Result<(), JobError> {
        self.adopt_recorded_winners().await?;
        loop {
            self.start_ready_stages().await?;
            let cancelled = self.env.state.cancel_requested(self.job).await?;
            match after_results(cancelled, self.tracker.all_complete()) {
                StagesStep::Cancel => {
                    info!(running = self.tracker.outstanding(), "job cancelled");
                    return Err(self.drain(JobError::Cancelled).await);
                }
                StagesStep::Done => return Ok(()),
                StagesStep::Wait => {}
            }
            if self.ownership.lost() {
                return Err(Ownership::lost_error());
            }
            let failure = match self.next_result().await? {
                Some(result) => self.handle_result(result, on_event).await?,
                None => self.check_leases().await?,
            };
            if let Some(failure) = failure {
                let error = JobError::TaskFailed {
                    stage: failure.key.stage.0,
                    partition: failure.key.partition,
                    attempts: failure.attempts,
                    message: failure.message,
                };
                info!(error = %error, running = self.tracker.outstanding(), "job failing");
                return Err(self.drain(error).await);
            }
        }
    }

    /// Winners recorded in the state store by an earlier run of this job (a coordinator
    /// that restarted): those tasks are not run again.
    async fn adopt_recorded_winners(&mut self) -> Result<(), JobError> {
        let recorded = self.env.state.task_outputs(self.job).await?;
        let mut adopted = 0;
        let mut other_plans = Vec::new();
        for (key, bytes) in recorded {
            match v1::TaskResult::decode(bytes.as_ref()) {
                Ok(result) if self.tracker.is_other_plans(&result) => other_plans.push(key),
                Ok(result) => {
                    if self.tracker.record_win(key, result) {
                        adopted += 1;
                    }
                }
                Err(e) => {
                    warn!(%key, error = %e, "undecodable recorded output; the task runs again")
                }
            }
        }
        if !other_plans.is_empty() {
            warn!(
                tasks = other_plans.len(),
                "the job planned differently this time (its sources changed since an earlier run): \
                 that run's task outputs are not reused, their tasks run again"
            );
            // Only the records go: their files stay until the job's sweep
            // (`cleanup::sweep_job_files`), which deletes a file only when its name parses as
            // this job's and no snapshot of the table references it.
            self.env
                .state
                .forget_task_outputs(self.job, &other_plans)
                .await?;
        }
        if adopted > 0 {
            info!(
                tasks = adopted,
                "resuming: task outputs recorded by an earlier run are reused"
            );
        }
        Ok(())
    }

    /// Starts every ready stage; a stage completed from recorded winners makes its
    /// dependents ready at once.
    async fn start_ready_stages(&mut self) -> Result<(), JobError> {
        loop {
            let ready = self.tracker.ready();
            if ready.is_empty() {
                return Ok(());
            }
            for id in ready {
                self.start_stage(id).await?;
            }
        }
    }

    async fn start_stage(&mut self, id: StageId) -> Result<(), JobError> {
        let outputs = self.tracker.outputs();
        let stage = self
            .tracker
            .stages()
            .iter()
            .find(|s| s.stage.id == id)
            .expect("ready stage exists");
        let plan: Arc<dyn datafusion::physical_plan::ExecutionPlan> = stage.stage.plan.clone();
        let tasks = stage.stage.tasks;
        let resolved = resolve_shuffles(plan, &outputs)?;
        let encoded = encode_plan(resolved.clone()).map_err(CoreError::from)?;
        info!(stage = %id, tasks, plan_bytes = encoded.len(), "stage started");
        self.stage_plans.insert(id, StagePlan { resolved, encoded });
        let to_run = self.tracker.start(id);
        self.publish(&to_run).await
    }

    /// Publishes a new attempt of each task in `keys`.
    async fn publish(&mut self, keys: &[TaskKey]) -> Result<(), JobError> {
        let stored = self.env.state.next_attempts(self.job, keys).await?;
        let attempts: Vec<(TaskKey, u32)> = keys
            .iter()
            .zip(stored)
            .map(|(key, stored)| (*key, self.tracker.next_attempt(*key, stored)))
            .collect();
        let tasks = attempts
            .iter()
            .map(|(key, attempt)| Ok(self.task_definition(*key, *attempt)?.encode_to_vec().into()))
            .collect::<Result<Vec<Bytes>, CoreError>>()?;
        self.env.queue.publish_tasks(tasks).await?;
        for (key, attempt) in attempts {
            self.tracker.record_published(key, attempt);
        }
        Ok(())
    }

    fn task_definition(&self, key: TaskKey, attempt: u32) -> Result<v1::TaskDefinition, CoreError> {
        let output = if self.tracker.is_final(key.stage) {
            self.final_output.clone()
        } else {
            task_definition::Output::Shuffle(v1::ShuffleOutput {
                prefix: self
                    .env
                    .scratch
                    .join(&stage_scratch_dir(self.job, key.stage.0))
                    .as_url_string(),
            })
        };
        Ok(v1::TaskDefinition {
            protocol_version: PROTOCOL_VERSION,
            job_id: self.job.to_string(),
            stage_id: key.stage.0,
            partition: key.partition,
            attempt,
            plan: self.tracker.fingerprint().to_string(),
            stage_plan: self.stage_plans[&key.stage]
                .for_task(key.partition as usize)?
                .to_vec(),
            output: Some(output),
        })
    }

    /// The next result of this job, or `None` when none came within a third of the lease
    /// (time to look at the leases).
    async fn next_result(&self) -> Result<Option<v1::TaskResult>, JobError> {
        let wait = self.env.lease_ttl / 3;
        let Ok(next) = tokio::time::timeout(wait, self.env.queue.next_result(self.job)).await
        else {
            return Ok(None);
        };
        let Some(delivery) = next? else {
            return Err(JobError::Internal(CoreError::Transport(
                "result queue closed".into(),
            )));
        };
        let decoded = v1::TaskResult::decode(delivery.payload());
        delivery.ack().await?;
        match decoded {
            Ok(result) if result.job_id == self.job.as_str() => Ok(Some(result)),
            Ok(result) => {
                warn!(other_job = %result.job_id, "result of another job; ignored");
                Ok(None)
            }
            Err(e) => {
                warn!(error = %e, "undecodable result; ignored");
                Ok(None)
            }
        }
    }

    /// Acts on one result; returns the failure that fails the job, if it does.
    async fn handle_result(
        &mut self,
        result: v1::TaskResult,
        on_event: &(dyn Fn(JobEvent) + Send + Sync),
    ) -> Result<Option<TaskFailure>, JobError> {
        let key = task_key(&result);
        let verdict = self.tracker.on_result(&result);
        let failed = matches!(result.outcome, Some(v1::task_result::Outcome::Failed(_)));
        match verdict {
            ResultVerdict::Claim => {
                let won = self.claim(key, &result).await?;
                self.record_span(&result, if won { "won" } else { "lost" });
                if won {
                    self.tracker.record_win(key, result);
                } else if let Some(stored) = self.stored_winner(key).await? {
                    // Another run of this job recorded a winner first: that one counts.
                    debug!(%key, attempt = result.attempt, "result lost to a recorded winner");
                    self.tracker.record_win(key, stored);
                }
                let (done, total) = self.tracker.progress();
                on_event(JobEvent::TaskFinished {
                    done,
                    total,
                    rows: self.tracker.final_rows(),
                    stages: self.tracker.stage_counts(),
                });
            }
            ResultVerdict::Lost => {
                self.record_span(&result, "lost");
                debug!(%key, attempt = result.attempt, "duplicate result lost; its output is swept")
            }
            ResultVerdict::Retry => {
                self.record_span(&result, "failed");
                warn!(%key, attempt = result.attempt, "task failed; retrying");
                self.publish(&[key]).await?;
            }
            ResultVerdict::Fail(failure) => {
                self.record_span(&result, "failed");
                return Ok(Some(failure));
            }
            ResultVerdict::Ignore => {
                self.record_span(&result, if failed { "failed" } else { "lost" });
                debug!(%key, attempt = result.attempt, "result of a superseded attempt ignored")
            }
        }
        Ok(None)
    }

    /// Claims `key`'s output for `result` in the state store (first result wins). An output
    /// recorded there by another plan of the job does not count: it is forgotten and the
    /// claim made again.
    async fn claim(&self, key: TaskKey, result: &v1::TaskResult) -> Result<bool, JobError> {
        let bytes: Bytes = result.encode_to_vec().into();
        if self
            .env
            .state
            .claim_task_output(self.job, key, bytes.clone())
            .await?
        {
            return Ok(true);
        }
        match self.stored_winner(key).await? {
            Some(stored) if self.tracker.is_other_plans(&stored) => {
                self.env.state.forget_task_outputs(self.job, &[key]).await?;
                Ok(self
                    .env
                    .state
                    .claim_task_output(self.job, key, bytes)
                    .await?)
            }
            _ => Ok(false),
        }
    }

    async fn stored_winner(&self, key: TaskKey) -> Result<Option<v1::TaskResult>, JobError> {
        let outputs = self.env.state.task_outputs(self.job).await?;
        Ok(outputs
            .into_iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, bytes)| v1::TaskResult::decode(bytes.as_ref()).ok()))
    }

    /// A running task whose attempt was seen holding its lease and whose lease has expired
    /// lost its worker (killed, frozen, partitioned away): run it again, counting a failure.
    async fn check_leases(&mut self) -> Result<Option<TaskFailure>, JobError> {
        for key in self.tracker.running() {
            let lease = self.env.state.lease(self.job, key).await?;
            match self.tracker.on_lease(key, lease) {
                None => {}
                Some(LeaseVerdict::Retry) => {
                    nightshift_core::metrics::lease_expired();
                    warn!(%key, "task lease expired; running the task again");
                    self.publish(&[key]).await?;
                }
                Some(LeaseVerdict::Fail(failure)) => {
                    nightshift_core::metrics::lease_expired();
                    return Ok(Some(failure));
                }
            }
        }
        Ok(None)
    }

    /// Marks the job ending, so workers skip its queued tasks and discard late output, then
    /// waits for the attempts still outstanding: until each has reported, lost its lease, or
    /// nothing has happened for a whole lease. What a straggler writes after that is removed
    /// by the job's late sweep. Returns `error`.
    async fn drain(&mut self, error: JobError) -> JobError {
        let state = match error {
            JobError::Cancelled => JobState::Cancelled,
            _ => JobState::Failed,
        };
        if let Err(e) = self
            .env
            .state
            .set_job_state(self.job, state, &error.to_string())
            .await
        {
            warn!(error = %e, "cannot record the job's end before draining");
        }
        let mut quiet_since = Instant::now();
        while self.tracker.outstanding() > 0 && quiet_since.elapsed() < self.env.lease_ttl {
            match self.next_result().await {
                Ok(Some(result)) => {
                    self.tracker.on_result(&result);
                    let failed =
                        matches!(result.outcome, Some(v1::task_result::Outcome::Failed(_)));
                    self.record_span(&result, if failed { "failed" } else { "lost" });
                    quiet_since = Instant::now();
                }
                Ok(None) => {
                    for key in self.tracker.running() {
                        if let Ok(lease) = self.env.state.lease(self.job, key).await {
                            // Verdicts are moot now; an expired lease just stops the wait.
                            let _ = self.tracker.on_lease(key, lease);
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot wait for running tasks");
                    break;
                }
            }
        }
        if self.tracker.outstanding() > 0 {
            info!(
                running = self.tracker.outstanding(),
                "tasks still running; the late sweep removes what they write"
            );
        }
        error
    }
}

/// What the stage loop does after the results it has: stop for a cancel, end with every
/// stage complete, or wait for more.
#[derive(Debug, PartialEq, Eq)]
enum StagesStep {
    Cancel,
    Done,
    Wait,
}

/// A cancel wins over completion: a job cancelled while its last tasks ran ends cancelled
/// with nothing committed (`nightshift cancel` promises it), not committed as if the cancel
/// came late.
fn after_results(cancel_requested: bool, all_complete: bool) -> StagesStep {
    match (cancel_requested, all_complete) {
        (true, _) => StagesStep::Cancel,
        (false, true) => StagesStep::Done,
        (false, false) => StagesStep::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_during_the_last_stage_wins_over_its_completion() {
        assert_eq!(after_results(true, true), StagesStep::Cancel);
        assert_eq!(after_results(true, false), StagesStep::Cancel);
        assert_eq!(after_results(false, true), StagesStep::Done);
        assert_eq!(after_results(false, false), StagesStep::Wait);
    }
}
