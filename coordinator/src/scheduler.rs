//! Stage and task bookkeeping for one job, as pure decisions: which stages can start, which
//! attempts are outstanding, what a result or an expired lease means (win, lose, retry,
//! fail, ignore). No I/O happens here; the job driver acts on the verdicts, and the unit
//! tests below pin every rule without services.
//!
//! Ballista's planner gives the stages and their dependencies; Ballista's in-memory
//! `ExecutionGraph` is not used because a restarted coordinator must resume from the
//! [`StateStore`](nightshift_core::transport::StateStore): winners are recorded there, and
//! attempt numbers come from a counter there, so they keep growing across restarts and a
//! result of an attempt published before a restart is never mistaken for a later one's.

use std::collections::{BTreeSet, HashMap};

use nightshift_core::ids::{StageId, TaskKey};
use nightshift_core::planner::{JobPlan, PlannedStage};
use nightshift_core::shuffle::{Segment, StageOutput};
use nightshift_proto::v1::{self, task_result::Outcome};

/// One task's attempts and outcome.
#[derive(Debug, Default)]
struct TaskRun {
    /// The latest attempt published (0: none yet).
    latest: u32,
    /// Attempts published and not yet reported or given up on.
    outstanding: BTreeSet<u32>,
    /// Failures counted against the attempt budget: failed attempts and expired leases.
    failures: u32,
    /// The attempt last seen holding the task's lease.
    leased: Option<u32>,
    /// The winning result.
    winner: Option<v1::TaskResult>,
}

/// One stage's tasks.
#[derive(Debug)]
pub struct StageRun {
    pub stage: PlannedStage,
    pub started: bool,
    tasks: Vec<TaskRun>,
}

impl StageRun {
    pub fn is_complete(&self) -> bool {
        self.tasks.iter().all(|t| t.winner.is_some())
    }

    fn done(&self) -> usize {
        self.tasks.iter().filter(|t| t.winner.is_some()).count()
    }

    fn winners(&self) -> impl Iterator<Item = &v1::TaskResult> {
        self.tasks.iter().filter_map(|t| t.winner.as_ref())
    }

    /// Rows and bytes the winning attempts wrote, and how many tasks have won.
    pub fn winner_totals(&self) -> (u64, u64, usize) {
        self.winners().fold((0, 0, 0), |(rows, bytes, n), w| {
            (rows + w.rows, bytes + w.bytes, n + 1)
        })
    }
}

/// Why a task failed the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    pub key: TaskKey,
    /// Attempts that failed (including lost ones).
    pub attempts: u32,
    pub message: String,
}

/// What to do with a task result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultVerdict {
    /// A success for a task without a winner: claim it in the state store, then
    /// [`StageTracker::record_win`] (or, if the claim loses, record the stored winner).
    Claim,
    /// Another attempt already won: the result's output is garbage.
    Lost,
    /// Publish the task again, as a new attempt.
    Retry,
    /// The task failed for good; the job fails.
    Fail(TaskFailure),
    /// Nothing to do: a failure of an attempt that a newer one superseded, a failure after
    /// the task was won, a result for a stage or partition the plan does not have.
    Ignore,
}

/// What an expired lease means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseVerdict {
    Retry,
    Fail(TaskFailure),
}

/// Every stage of a job.
#[derive(Debug)]
pub struct StageTracker {
    stages: Vec<StageRun>,
    /// Failures a task may have before the job fails (at least 1).
    max_attempts: u32,
    /// The plan's fingerprint ([`JobPlan::fingerprint`]): results echo their task's, and
    /// only this plan's count.
    plan: String,
}

impl StageTracker {
    pub fn new(plan: &JobPlan, max_attempts: u32, fingerprint: impl Into<String>) -> Self {
        StageTracker {
            stages: plan
                .stages
                .iter()
                .map(|stage| StageRun {
                    stage: stage.clone(),
                    started: false,
                    tasks: (0..stage.tasks).map(|_| TaskRun::default()).collect(),
                })
                .collect(),
            max_attempts: max_attempts.max(1),
            plan: fingerprint.into(),
        }
    }

    /// The fingerprint tasks of this plan carry.
    pub fn fingerprint(&self) -> &str {
        &self.plan
    }

    /// Whether `result` is for a task of this plan but was produced under another plan of
    /// the job: one an earlier coordinator made before its sources changed. Such an output
    /// is never reused; mixing it with this plan's could lose or repeat rows.
    pub fn is_other_plans(&self, result: &v1::TaskResult) -> bool {
        self.task(task_key(result)).is_some() && result.plan != self.plan
    }

    pub fn stages(&self) -> &[StageRun] {
        &self.stages
    }

    fn stage(&self, id: StageId) -> Option<&StageRun> {
        self.stages.iter().find(|s| s.stage.id == id)
    }

    fn task_mut(&mut self, key: TaskKey) -> Option<&mut TaskRun> {
        self.stages
            .iter_mut()
            .find(|s| s.stage.id == key.stage)?
            .tasks
            .get_mut(key.partition as usize)
    }

    fn task(&self, key: TaskKey) -> Option<&TaskRun> {
        self.stage(key.stage)?.tasks.get(key.partition as usize)
    }

    pub fn is_final(&self, stage: StageId) -> bool {
        self.stage(stage).is_some_and(|s| s.stage.is_final)
    }

    /// Stages not started whose upstream stages are all complete.
    pub fn ready(&self) -> Vec<StageId> {
        self.stages
            .iter()
            .filter(|s| !s.started)
            .filter(|s| {
                s.stage
                    .upstream
                    .iter()
                    .all(|u| self.stage(*u).is_some_and(StageRun::is_complete))
            })
            .map(|s| s.stage.id)
            .collect()
    }

    /// Marks `id` started and returns its tasks that still need an attempt (those without a
    /// winner, e.g. recorded by an earlier run of the job).
    pub fn start(&mut self, id: StageId) -> Vec<TaskKey> {
        let Some(stage) = self.stages.iter_mut().find(|s| s.stage.id == id) else {
            return Vec::new();
        };
        stage.started = true;
        stage
            .tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.winner.is_none())
            .map(|(partition, _)| TaskKey {
                stage: id,
                partition: partition as u32,
            })
            .collect()
    }

    /// The number of the next attempt of `key`: the state store's counter, unless that went
    /// backwards (state lost) below what this run already published.
    pub fn next_attempt(&self, key: TaskKey, from_store: u32) -> u32 {
        from_store.max(self.latest_attempt(key) + 1)
    }

    /// Records `attempt` of `key` as published.
    pub fn record_published(&mut self, key: TaskKey, attempt: u32) {
        if let Some(task) = self.task_mut(key) {
            task.latest = task.latest.max(attempt);
            task.outstanding.insert(attempt);
        }
    }

    /// Records the winning result of `key` (this run's claim, or one the state store holds
    /// from an earlier run).
    /// Returns false for a task the plan does not have (a winner recorded for another
    /// query of the job: its own stages or a check's).
    pub fn record_win(&mut self, key: TaskKey, result: v1::TaskResult) -> bool {
        if result.plan != self.plan {
            return false;
        }
        let Some(task) = self.task_mut(key) else {
            return false;
        };
        if task.winner.is_none() {
            task.winner = Some(result);
        }
        true
    }

    /// The verdict on a result of attempt `result.attempt` of its task.
    pub fn on_result(&mut self, result: &v1::TaskResult) -> ResultVerdict {
        let key = task_key(result);
        let max_attempts = self.max_attempts;
        if self.is_other_plans(result) {
            return match result.outcome {
                Some(Outcome::Failed(_)) | None => ResultVerdict::Ignore,
                Some(_) => ResultVerdict::Lost,
            };
        }
        let Some(task) = self.task_mut(key) else {
            return ResultVerdict::Ignore;
        };
        task.outstanding.remove(&result.attempt);
        match &result.outcome {
            Some(Outcome::Failed(failed)) => {
                if task.winner.is_some() || result.attempt != task.latest {
                    return ResultVerdict::Ignore;
                }
                task.failures += 1;
                if failed.retryable && task.failures < max_attempts {
                    ResultVerdict::Retry
                } else {
                    ResultVerdict::Fail(TaskFailure {
                        key,
                        attempts: task.failures,
                        message: failed.message.clone(),
                    })
                }
            }
            Some(Outcome::Shuffle(_) | Outcome::Files(_) | Outcome::Returned(_))
                if task.winner.is_some() =>
            {
                ResultVerdict::Lost
            }
            Some(Outcome::Shuffle(_) | Outcome::Files(_) | Outcome::Returned(_)) => {
                ResultVerdict::Claim
            }
            None => ResultVerdict::Ignore,
        }
    }

    /// Tasks of started stages without a winner whose latest attempt is outstanding: the
    /// ones whose leases are worth checking.
    pub fn running(&self) -> Vec<TaskKey> {
        self.stages
            .iter()
            .filter(|s| s.started)
            .flat_map(|s| {
                s.tasks.iter().enumerate().filter_map(move |(p, t)| {
                    (t.winner.is_none() && t.outstanding.contains(&t.latest)).then_some(TaskKey {
                        stage: s.stage.id,
                        partition: p as u32,
                    })
                })
            })
            .collect()
    }

    /// The verdict on `key`'s lease as the state store shows it now (`None`: no live
    /// lease). Only an attempt seen holding the lease can lose it: a task still queued
    /// has never had one.
    pub fn on_lease(&mut self, key: TaskKey, lease: Option<u32>) -> Option<LeaseVerdict> {
        let max_attempts = self.max_attempts;
        let task = self.task_mut(key)?;
        if task.winner.is_some() {
            return None;
        }
        if let Some(attempt) = lease {
            task.leased = Some(attempt);
            return None;
        }
        if task.leased != Some(task.latest) || !task.outstanding.contains(&task.latest) {
            return None;
        }
        task.leased = None;
        task.outstanding.remove(&task.latest);
        task.failures += 1;
        if task.failures < max_attempts {
            Some(LeaseVerdict::Retry)
        } else {
            Some(LeaseVerdict::Fail(TaskFailure {
                key,
                attempts: task.failures,
                message: "its worker stopped renewing the task lease".into(),
            }))
        }
    }

    /// Attempts published and not yet reported, over all tasks.
    pub fn outstanding(&self) -> usize {
        self.stages
            .iter()
            .flat_map(|s| &s.tasks)
            .map(|t| t.outstanding.len())
            .sum()
    }

    pub fn all_complete(&self) -> bool {
        self.stages.iter().all(StageRun::is_complete)
    }

    /// The latest attempt published for `key` (0 if none).
    pub fn latest_attempt(&self, key: TaskKey) -> u32 {
        self.task(key).map_or(0, |t| t.latest)
    }

    /// Shuffle outputs of the complete non-final stages, for resolving downstream plans.
    pub fn outputs(&self) -> HashMap<u32, StageOutput> {
        self.stages
            .iter()
            .filter(|s| s.is_complete() && !s.stage.is_final)
            .map(|s| {
                let segments = s.winners().flat_map(|r| match &r.outcome {
                    Some(Outcome::Shuffle(w)) => w.segments.iter().map(Segment::from).collect(),
                    _ => Vec::new(),
                });
                (
                    s.stage.id.0,
                    StageOutput::from_segments(s.stage.output_partitions, segments),
                )
            })
            .collect()
    }

    fn final_winners(&self) -> impl Iterator<Item = &v1::TaskResult> {
        self.stages
            .iter()
            .filter(|s| s.stage.is_final)
            .flat_map(StageRun::winners)
    }

    /// Data files of the winning final-stage results.
    pub fn committed_files(&self) -> Vec<String> {
        self.final_winners()
            .flat_map(|r| match &r.outcome {
                Some(Outcome::Files(f)) => f.data_files_json.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// Data files of the rejects table (quarantined rows) written by the final stage's
    /// winning attempts.
    pub fn committed_reject_files(&self) -> Vec<String> {
        self.final_winners()
            .flat_map(|r| match &r.outcome {
                Some(Outcome::Files(f)) => f.reject_files_json.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The target's partitions of the rows the final stage's winning attempts set aside,
    /// each once.
    pub fn set_aside_partitions(&self) -> Vec<String> {
        let partitions: std::collections::BTreeSet<String> = self
            .final_winners()
            .flat_map(|r| match &r.outcome {
                Some(Outcome::Files(f)) => f.set_aside_partitions_json.clone(),
                _ => Vec::new(),
            })
            .collect();
        partitions.into_iter().collect()
    }

    /// What the final stage's winning attempts of a check's query returned: the rows
    /// counted and the first few samples.
    pub fn final_returned(&self, samples: usize) -> (u64, Vec<String>) {
        self.final_winners()
            .filter_map(|r| match &r.outcome {
                Some(Outcome::Returned(returned)) => Some(returned),
                _ => None,
            })
            .fold((0, Vec::new()), |(count, mut kept), returned| {
                let room = samples.saturating_sub(kept.len());
                kept.extend(returned.samples.iter().take(room).cloned());
                (count + returned.count, kept)
            })
    }

    /// Rows the final stage's winning attempts set aside in the rejects table.
    pub fn final_rejected_rows(&self) -> u64 {
        self.final_winners()
            .map(|r| match &r.outcome {
                Some(Outcome::Files(f)) => f.rejected_rows,
                _ => 0,
            })
            .sum()
    }

    /// The row-check outcomes of the final stage's winning attempts.
    pub fn final_check_outcomes(&self) -> Vec<v1::CheckOutcome> {
        self.final_winners()
            .flat_map(|r| match &r.outcome {
                Some(Outcome::Files(f)) => f.checks.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// (tasks done, tasks total) over all stages.
    pub fn progress(&self) -> (usize, usize) {
        self.stages
            .iter()
            .fold((0, 0), |(d, t), s| (d + s.done(), t + s.tasks.len()))
    }

    /// Tasks done and total of every stage, in stage order.
    pub fn stage_counts(&self) -> Vec<StageCount> {
        self.stages
            .iter()
            .map(|s| StageCount {
                stage: s.stage.id.0,
                done: s.done(),
                total: s.tasks.len(),
            })
            .collect()
    }

    /// Rows written by the final stage.
    pub fn final_rows(&self) -> u64 {
        self.final_winners().map(|r| r.rows).sum()
    }

    /// Bytes of data files written by the final stage.
    pub fn final_bytes(&self) -> u64 {
        self.final_winners().map(|r| r.bytes).sum()
    }
}

/// The task a result belongs to.
pub fn task_key(result: &v1::TaskResult) -> TaskKey {
    TaskKey {
        stage: StageId(result.stage_id),
        partition: result.partition,
    }
}

/// One stage's progress, as reported to progress bars and the job API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StageCount {
    pub stage: u32,
    pub done: usize,
    pub total: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballista_core::execution_plans::ShuffleWriterExec;
    use datafusion::physical_plan::empty::EmptyExec;
    use nightshift_proto::v1::{FilesWritten, ShuffleWritten, TaskFailed};
    use std::sync::Arc;

    /// Stage 1 (2 tasks) → stage 2 (final, 1 task).
    fn tracker(max_attempts: u32) -> StageTracker {
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::empty());
        let stage = |id, tasks, upstream: Vec<u32>, is_final| PlannedStage {
            id: StageId(id),
            plan: Arc::new(
                ShuffleWriterExec::try_new(
                    "j".into(),
                    id as usize,
                    Arc::new(EmptyExec::new(schema.clone())),
                    String::new(),
                    None,
                )
                .unwrap(),
            ),
            tasks,
            upstream: upstream.into_iter().map(StageId).collect(),
            output_partitions: 1,
            is_final,
        };
        let plan = JobPlan {
            stages: vec![stage(1, 2, vec![], false), stage(2, 1, vec![1], true)],
            output_schema: schema.clone(),
        };
        StageTracker::new(&plan, max_attempts, "")
    }

    fn key(stage: u32, partition: u32) -> TaskKey {
        TaskKey {
            stage: StageId(stage),
            partition,
        }
    }

    fn result(key: TaskKey, attempt: u32, outcome: Outcome) -> v1::TaskResult {
        v1::TaskResult {
            stage_id: key.stage.0,
            partition: key.partition,
            attempt,
            rows: 10,
            outcome: Some(outcome),
            ..Default::default()
        }
    }

    fn success(key: TaskKey, attempt: u32) -> v1::TaskResult {
        let outcome = if key.stage.0 == 2 {
            Outcome::Files(FilesWritten {
                checks: Vec::new(),
                data_files_json: vec![format!("a{attempt}")],
                ..Default::default()
            })
        } else {
            Outcome::Shuffle(ShuffleWritten { segments: vec![] })
        };
        result(key, attempt, outcome)
    }

    fn failure(key: TaskKey, attempt: u32, retryable: bool) -> v1::TaskResult {
        result(
            key,
            attempt,
            Outcome::Failed(TaskFailed {
                message: "boom".into(),
                retryable,
            }),
        )
    }

    /// Starts stage 1 and publishes attempt `attempt` of both tasks.
    fn started(max_attempts: u32, attempt: u32) -> StageTracker {
        let mut t = tracker(max_attempts);
        assert_eq!(t.ready(), vec![StageId(1)]);
        for k in t.start(StageId(1)) {
            t.record_published(k, attempt);
        }
        t
    }

    #[test]
    fn stages_start_when_their_inputs_are_complete() {
        let mut t = started(3, 1);
        assert!(t.ready().is_empty());
        for p in 0..2 {
            assert_eq!(t.on_result(&success(key(1, p), 1)), ResultVerdict::Claim);
            t.record_win(key(1, p), success(key(1, p), 1));
        }
        assert_eq!(t.ready(), vec![StageId(2)]);
        assert_eq!(t.start(StageId(2)), vec![key(2, 0)]);
        t.record_published(key(2, 0), 1);
        assert_eq!(t.progress(), (2, 3));
        assert_eq!(t.on_result(&success(key(2, 0), 1)), ResultVerdict::Claim);
        t.record_win(key(2, 0), success(key(2, 0), 1));
        assert!(t.all_complete());
        assert_eq!(t.committed_files(), vec!["a1".to_string()]);
        assert_eq!(t.final_rows(), 10);
    }

    #[test]
    fn the_first_success_wins_and_later_ones_lose() {
        let mut t = started(3, 1);
        t.record_published(key(1, 0), 2);
        assert_eq!(t.on_result(&success(key(1, 0), 2)), ResultVerdict::Claim);
        t.record_win(key(1, 0), success(key(1, 0), 2));
        assert_eq!(t.on_result(&success(key(1, 0), 1)), ResultVerdict::Lost);
        // The same result delivered twice loses the second time.
        assert_eq!(t.on_result(&success(key(1, 0), 2)), ResultVerdict::Lost);
    }

    #[test]
    fn a_success_of_an_older_attempt_is_as_good_as_the_latest() {
        let mut t = started(3, 4); // attempts 1-3 were published before a restart
        assert_eq!(t.on_result(&success(key(1, 1), 2)), ResultVerdict::Claim);
    }

    #[test]
    fn retryable_failures_retry_until_the_budget_is_spent() {
        let mut t = started(3, 1);
        let k = key(1, 0);
        assert_eq!(t.on_result(&failure(k, 1, true)), ResultVerdict::Retry);
        t.record_published(k, 2);
        assert_eq!(t.on_result(&failure(k, 2, true)), ResultVerdict::Retry);
        t.record_published(k, 3);
        assert_eq!(
            t.on_result(&failure(k, 3, true)),
            ResultVerdict::Fail(TaskFailure {
                key: k,
                attempts: 3,
                message: "boom".into()
            })
        );
    }

    #[test]
    fn a_non_retryable_failure_fails_at_once() {
        let mut t = started(3, 1);
        assert!(matches!(
            t.on_result(&failure(key(1, 1), 1, false)),
            ResultVerdict::Fail(TaskFailure { attempts: 1, .. })
        ));
    }

    #[test]
    fn failures_of_superseded_attempts_are_ignored() {
        // After a restart the counter goes on: attempt 5 is the latest, 2 is older.
        let mut t = started(3, 5);
        assert_eq!(
            t.on_result(&failure(key(1, 0), 2, false)),
            ResultVerdict::Ignore
        );
        // An attempt number above the latest is not ours either (state lost in between).
        assert_eq!(
            t.on_result(&failure(key(1, 0), 9, false)),
            ResultVerdict::Ignore
        );
        assert_eq!(t.on_result(&success(key(1, 0), 5)), ResultVerdict::Claim);
        t.record_win(key(1, 0), success(key(1, 0), 5));
        // A failure after the task was won changes nothing.
        t.record_published(key(1, 0), 6);
        assert_eq!(
            t.on_result(&failure(key(1, 0), 6, false)),
            ResultVerdict::Ignore
        );
    }

    #[test]
    fn duplicate_results_count_once_toward_outstanding() {
        let mut t = started(3, 1);
        assert_eq!(t.outstanding(), 2);
        t.on_result(&success(key(1, 0), 1));
        t.record_win(key(1, 0), success(key(1, 0), 1));
        t.on_result(&success(key(1, 0), 1));
        t.on_result(&failure(key(1, 0), 1, false));
        assert_eq!(t.outstanding(), 1, "only partition 1 is still running");
    }

    #[test]
    fn results_the_plan_does_not_have_are_ignored() {
        let mut t = started(3, 1);
        assert_eq!(t.on_result(&success(key(7, 0), 1)), ResultVerdict::Ignore);
        assert_eq!(t.on_result(&success(key(1, 9), 1)), ResultVerdict::Ignore);
        let empty = v1::TaskResult {
            stage_id: 1,
            ..Default::default()
        };
        assert_eq!(t.on_result(&empty), ResultVerdict::Ignore);
    }

    #[test]
    fn only_a_lease_seen_held_can_expire() {
        let mut t = started(2, 1);
        let k = key(1, 0);
        assert_eq!(t.running(), vec![key(1, 0), key(1, 1)]);
        // Queued, never leased: nothing.
        assert_eq!(t.on_lease(k, None), None);
        assert_eq!(t.on_lease(k, Some(1)), None);
        assert_eq!(t.on_lease(k, None), Some(LeaseVerdict::Retry));
        assert_eq!(t.outstanding(), 1);
        t.record_published(k, 2);
        assert_eq!(t.on_lease(k, Some(2)), None);
        assert!(matches!(
            t.on_lease(k, None),
            Some(LeaseVerdict::Fail(TaskFailure { attempts: 2, .. }))
        ));
    }

    #[test]
    fn an_older_attempts_lease_does_not_expire_the_latest() {
        let mut t = started(3, 1);
        let k = key(1, 0);
        assert_eq!(t.on_lease(k, Some(1)), None);
        t.on_result(&failure(k, 1, true));
        t.record_published(k, 2);
        // Attempt 1 held the lease; attempt 2 is queued and has none yet.
        assert_eq!(t.on_lease(k, None), None);
    }

    #[test]
    fn attempt_numbers_never_go_backwards() {
        let mut t = started(3, 4);
        assert_eq!(t.next_attempt(key(1, 0), 5), 5);
        // The state store was flushed: its counter restarted below this run's attempts.
        assert_eq!(t.next_attempt(key(1, 0), 1), 5);
        t.record_published(key(1, 0), 5);
        assert_eq!(t.next_attempt(key(1, 0), 2), 6);
        assert_eq!(t.next_attempt(key(1, 1), 1), 5);
    }

    #[test]
    fn recorded_winners_are_not_published_again() {
        let mut t = tracker(3);
        assert!(t.record_win(key(1, 1), success(key(1, 1), 3)));
        assert_eq!(t.start(StageId(1)), vec![key(1, 0)]);
    }

    #[test]
    fn winners_of_another_query_of_the_job_are_not_this_plans() {
        // A check's stages are numbered after the job's; each tracker adopts only its own.
        let mut t = tracker(3);
        assert!(!t.record_win(key(1001, 0), success(key(1001, 0), 1)));
        assert_eq!(t.progress(), (0, 3));
        let late = success(key(7, 0), 2);
        assert_eq!(t.on_result(&late), ResultVerdict::Ignore);
    }

    /// `result` as produced under the plan `plan`.
    fn under(plan: &str, mut result: v1::TaskResult) -> v1::TaskResult {
        result.plan = plan.to_string();
        result
    }

    #[test]
    fn outputs_of_another_plan_of_the_job_are_never_taken() {
        // A coordinator planned again after a restart, and the sources had changed: the
        // earlier plan's recorded outputs and late results are not this plan's.
        let plan = JobPlan {
            stages: tracker(3).stages.iter().map(|s| s.stage.clone()).collect(),
            output_schema: Arc::new(datafusion::arrow::datatypes::Schema::empty()),
        };
        let mut t = StageTracker::new(&plan, 3, "new");
        let old = under("old", success(key(1, 0), 1));
        assert!(t.is_other_plans(&old));
        assert!(!t.record_win(key(1, 0), old.clone()));
        assert_eq!(t.start(StageId(1)), vec![key(1, 0), key(1, 1)]);
        t.record_published(key(1, 0), 2);
        // Its late success is garbage to sweep, its late failure nothing.
        assert_eq!(t.on_result(&old), ResultVerdict::Lost);
        let failed = under("old", failure(key(1, 0), 1, true));
        assert_eq!(t.on_result(&failed), ResultVerdict::Ignore);
        assert_eq!(t.outstanding(), 1, "the new attempt is still awaited");
        // This plan's result wins as usual.
        let new = under("new", success(key(1, 0), 2));
        assert!(!t.is_other_plans(&new));
        assert_eq!(t.on_result(&new), ResultVerdict::Claim);
        assert!(t.record_win(key(1, 0), new));
        // A result for a task this plan does not have is another query's, not another plan's.
        assert!(!t.is_other_plans(&under("old", success(key(9, 0), 1))));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_result() -> impl Strategy<Value = v1::TaskResult> {
            let outcome = prop_oneof![
                Just(None),
                Just(Some(Outcome::Shuffle(ShuffleWritten { segments: vec![] }))),
                Just(Some(Outcome::Files(FilesWritten {
                    checks: Vec::new(),
                    data_files_json: vec!["f".into()],
                    ..Default::default()
                }))),
                any::<bool>().prop_map(|retryable| Some(Outcome::Failed(TaskFailed {
                    message: "x".into(),
                    retryable
                }))),
            ];
            (0..4u32, 0..4u32, 0..6u32, outcome).prop_map(|(stage, partition, attempt, outcome)| {
                v1::TaskResult {
                    stage_id: stage,
                    partition,
                    attempt,
                    outcome,
                    ..Default::default()
                }
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// Whatever results arrive, in whatever order: no panic, a won task stays won
            /// with its first winner, and outstanding attempts never grow from a result.
            #[test]
            fn results_in_any_order_keep_the_invariants(
                results in prop::collection::vec(any_result(), 0..40),
                leases in prop::collection::vec((0..3u32, proptest::option::of(0..6u32)), 0..10),
            ) {
                let mut t = started(3, 1);
                let mut winners: HashMap<TaskKey, u32> = HashMap::new();
                for result in &results {
                    let before = t.outstanding();
                    let verdict = t.on_result(result);
                    prop_assert!(t.outstanding() <= before);
                    let k = task_key(result);
                    match verdict {
                        ResultVerdict::Claim => {
                            prop_assert!(!winners.contains_key(&k));
                            t.record_win(k, result.clone());
                            winners.insert(k, result.attempt);
                        }
                        ResultVerdict::Lost => prop_assert!(winners.contains_key(&k)),
                        ResultVerdict::Retry => {
                            let next = t.next_attempt(k, 1);
                            prop_assert!(next > t.latest_attempt(k));
                            t.record_published(k, next);
                        }
                        ResultVerdict::Fail(f) => prop_assert!(f.attempts >= 1),
                        ResultVerdict::Ignore => {}
                    }
                }
                for (partition, lease) in leases {
                    let _ = t.on_lease(key(1, partition), lease);
                }
                let (done, total) = t.progress();
                prop_assert!(done <= total);
                prop_assert_eq!(done, winners.len());
            }
        }
    }
}
