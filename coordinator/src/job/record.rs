//! What a job's report shows, gathered as the job runs: each task attempt as the coordinator
//! saw it ([`TaskSpan`]), each stage's plan, rows, bytes and time ([`StageSummary`]), and the
//! whole run ([`RunRecord`]). Pure: the driver feeds it results and times, and the report page
//! (`crate::report_page`) draws it.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::physical_plan::{ExecutionPlan, displayable};
use nightshift_proto::v1::{self, task_result::Outcome};
use serde::{Deserialize, Serialize};

use super::JobReport;
use crate::scheduler::StageTracker;

/// Task spans a record keeps: the first ones, so a report of a job of 100,000 tasks stays a
/// page (the stage totals still count every task).
pub const MAX_SPANS: usize = 5_000;

/// Characters of a plan line a stage summary keeps.
const MAX_OPERATOR_CHARS: usize = 160;

/// One task attempt, as its result reached the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpan {
    pub stage: u32,
    pub partition: u32,
    pub attempt: u32,
    pub worker: String,
    /// Milliseconds from the job's start to the attempt's start (its result's arrival less
    /// the time the worker says it ran) and to its result's arrival.
    pub start_ms: u64,
    pub end_ms: u64,
    pub rows: u64,
    pub bytes: u64,
    /// `won` (its output is the task's), `lost` (another attempt's is), `failed`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl TaskSpan {
    /// The span of `result`, which arrived `received_ms` after the job started, judged
    /// `outcome`.
    pub fn of(result: &v1::TaskResult, outcome: &str, received_ms: u64) -> Self {
        let error = match &result.outcome {
            Some(Outcome::Failed(failed)) => failed.message.clone(),
            _ => String::new(),
        };
        TaskSpan {
            stage: result.stage_id,
            partition: result.partition,
            attempt: result.attempt,
            worker: result.worker_id.clone(),
            start_ms: received_ms.saturating_sub(result.elapsed_ms),
            end_ms: received_ms,
            rows: result.rows,
            bytes: result.bytes,
            outcome: outcome.to_string(),
            error,
        }
    }
}

/// Appends `span` unless the record is full.
pub fn keep_span(spans: &mut Vec<TaskSpan>, span: TaskSpan) {
    if spans.len() < MAX_SPANS {
        spans.push(span);
    }
}

/// One stage of the plan and what its tasks did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSummary {
    pub stage: u32,
    /// Stages whose output this one reads.
    pub upstream: Vec<u32>,
    pub tasks: usize,
    pub tasks_done: usize,
    /// The stage writes the target table (the others write shuffle output).
    pub is_final: bool,
    /// The stage's plan, one operator per line, indented by depth.
    pub operators: Vec<String>,
    /// Rows and bytes the winning attempts wrote.
    pub rows: u64,
    pub bytes: u64,
    /// Milliseconds from the job's start to the first attempt's start and the last
    /// result's arrival, over the spans kept; `None` before any result.
    pub start_ms: Option<u64>,
    pub end_ms: Option<u64>,
    /// Attempts that did not win (failed, retried, duplicates), over the spans kept.
    pub other_attempts: usize,
    /// The `[[check]]` whose query the stage belongs to; `None` for the job's own stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

/// Each stage of `tracker` with its totals, timed by `spans`.
pub fn stage_summaries(tracker: &StageTracker, spans: &[TaskSpan]) -> Vec<StageSummary> {
    tracker
        .stages()
        .iter()
        .map(|run| {
            let id = run.stage.id.0;
            let mine: Vec<&TaskSpan> = spans.iter().filter(|s| s.stage == id).collect();
            let (rows, bytes, done) = run.winner_totals();
            let plan: Arc<dyn ExecutionPlan> = run.stage.plan.clone();
            StageSummary {
                stage: id,
                upstream: run.stage.upstream.iter().map(|s| s.0).collect(),
                tasks: run.stage.tasks,
                tasks_done: done,
                is_final: run.stage.is_final,
                operators: plan_lines(&plan),
                rows,
                bytes,
                start_ms: mine.iter().map(|s| s.start_ms).min(),
                end_ms: mine.iter().map(|s| s.end_ms).max(),
                other_attempts: mine.iter().filter(|s| s.outcome != "won").count(),
                check: None,
            }
        })
        .collect()
}

/// The plan's operators, one per line with their depth's indent, each cut to a readable
/// length.
fn plan_lines(plan: &Arc<dyn ExecutionPlan>) -> Vec<String> {
    displayable(plan.as_ref())
        .indent(false)
        .to_string()
        .lines()
        .map(|line| {
            if line.chars().count() > MAX_OPERATOR_CHARS {
                let cut: String = line.chars().take(MAX_OPERATOR_CHARS).collect();
                format!("{cut}…")
            } else {
                line.to_string()
            }
        })
        .collect()
}

/// A job's run, whatever its end: what the report page draws and `nightshift report` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix milliseconds when the run started.
    pub started_at_ms: i64,
    pub report: JobReport,
    pub stages: Vec<StageSummary>,
    /// Task attempts, in the order their results arrived (at most [`MAX_SPANS`]).
    pub timeline: Vec<TaskSpan>,
    /// The snapshot summary the job committed (or would have): code digest, git commit,
    /// params, inputs, check verdicts.
    pub lineage: BTreeMap<String, String>,
    /// The SQL of the transform.
    #[serde(default)]
    pub sql: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(stage: u32, attempt: u32, elapsed_ms: u64, outcome: Outcome) -> v1::TaskResult {
        v1::TaskResult {
            stage_id: stage,
            partition: 0,
            attempt,
            worker_id: "w-1".into(),
            rows: 7,
            bytes: 70,
            elapsed_ms,
            outcome: Some(outcome),
            ..Default::default()
        }
    }

    #[test]
    fn a_span_starts_when_its_worker_says_it_began() {
        let done = result(1, 2, 300, Outcome::Shuffle(v1::ShuffleWritten::default()));
        let span = TaskSpan::of(&done, "won", 1_000);
        assert_eq!((span.start_ms, span.end_ms), (700, 1_000));
        assert_eq!((span.rows, span.attempt, span.error.as_str()), (7, 2, ""));
        // A clock that says the task ran longer than the job has: it starts at 0.
        let early = TaskSpan::of(&done, "won", 100);
        assert_eq!(early.start_ms, 0);
        let failed = result(
            1,
            1,
            5,
            Outcome::Failed(v1::TaskFailed {
                message: "disk full".into(),
                retryable: true,
            }),
        );
        assert_eq!(TaskSpan::of(&failed, "failed", 10).error, "disk full");
    }

    #[test]
    fn the_record_keeps_at_most_max_spans() {
        let mut spans = Vec::new();
        let done = result(1, 1, 1, Outcome::Shuffle(v1::ShuffleWritten::default()));
        for i in 0..MAX_SPANS + 3 {
            keep_span(&mut spans, TaskSpan::of(&done, "won", i as u64));
        }
        assert_eq!(spans.len(), MAX_SPANS);
        assert_eq!(spans.last().map(|s| s.end_ms), Some(MAX_SPANS as u64 - 1));
    }
}
