//! Stage and task bookkeeping for one job: which stages can start, which task attempts are
//! outstanding, and which result won each task.
//!
//! Ballista's planner gives the stages and their dependencies; Ballista's in-memory
//! `ExecutionGraph` is not used because its state must survive a coordinator restart (it
//! will live in the [`StateStore`](nightshift_core::transport::StateStore)); this module
//! keeps the little that a job needs: attempts per task and the winning output per task.

use std::collections::{BTreeMap, HashMap};

use nightshift_core::ids::{StageId, TaskKey};
use nightshift_core::planner::{JobPlan, PlannedStage};
use nightshift_core::shuffle::{Segment, StageOutput};
use nightshift_proto::v1::{self, task_result::Outcome};

/// Progress of one stage.
#[derive(Debug)]
pub struct StageProgress {
    pub stage: PlannedStage,
    pub started: bool,
    /// Latest attempt number published per partition.
    pub attempts: HashMap<u32, u32>,
    /// Winning result per partition.
    pub done: BTreeMap<u32, v1::TaskResult>,
}

impl StageProgress {
    pub fn is_complete(&self) -> bool {
        self.done.len() == self.stage.tasks
    }
}

/// All stages of a job.
#[derive(Debug)]
pub struct StageTracker {
    pub stages: Vec<StageProgress>,
}

impl StageTracker {
    pub fn new(plan: &JobPlan) -> Self {
        StageTracker {
            stages: plan
                .stages
                .iter()
                .map(|stage| StageProgress {
                    stage: stage.clone(),
                    started: false,
                    attempts: HashMap::new(),
                    done: BTreeMap::new(),
                })
                .collect(),
        }
    }

    fn get(&self, id: StageId) -> Option<&StageProgress> {
        self.stages.iter().find(|s| s.stage.id == id)
    }

    pub fn get_mut(&mut self, id: StageId) -> Option<&mut StageProgress> {
        self.stages.iter_mut().find(|s| s.stage.id == id)
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
                    .all(|u| self.get(*u).is_some_and(StageProgress::is_complete))
            })
            .map(|s| s.stage.id)
            .collect()
    }

    pub fn all_complete(&self) -> bool {
        self.stages.iter().all(StageProgress::is_complete)
    }

    /// Shuffle outputs of the complete non-final stages, for resolving downstream plans.
    pub fn outputs(&self) -> HashMap<u32, StageOutput> {
        self.stages
            .iter()
            .filter(|s| s.is_complete() && !s.stage.is_final)
            .map(|s| {
                let segments = s.done.values().flat_map(|r| match &r.outcome {
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

    /// Data files of the winning final-stage results.
    pub fn committed_files(&self) -> Vec<String> {
        self.stages
            .iter()
            .filter(|s| s.stage.is_final)
            .flat_map(|s| s.done.values())
            .flat_map(|r| match &r.outcome {
                Some(Outcome::Files(f)) => f.data_files_json.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// (tasks done, tasks total) over all stages.
    pub fn progress(&self) -> (usize, usize) {
        self.stages
            .iter()
            .fold((0, 0), |(d, t), s| (d + s.done.len(), t + s.stage.tasks))
    }

    /// Tasks done and total of every stage, in stage order.
    pub fn stage_counts(&self) -> Vec<StageCount> {
        self.stages
            .iter()
            .map(|s| StageCount {
                stage: s.stage.id.0,
                done: s.done.len(),
                total: s.stage.tasks,
            })
            .collect()
    }

    /// Rows written by the final stage.
    pub fn final_rows(&self) -> u64 {
        self.stages
            .iter()
            .filter(|s| s.stage.is_final)
            .flat_map(|s| s.done.values())
            .map(|r| r.rows)
            .sum()
    }

    /// Bytes of data files written by the final stage.
    pub fn final_bytes(&self) -> u64 {
        self.stages
            .iter()
            .filter(|s| s.stage.is_final)
            .flat_map(|s| s.done.values())
            .map(|r| r.bytes)
            .sum()
    }

    pub fn task_key(result: &v1::TaskResult) -> TaskKey {
        TaskKey {
            stage: StageId(result.stage_id),
            partition: result.partition,
        }
    }
}

/// One stage's progress, as reported to progress bars and the job API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StageCount {
    pub stage: u32,
    pub done: usize,
    pub total: usize,
}
