//! Printing job reports: aligned text for people, one JSON object for scripts.

use indicatif::HumanBytes;
use nightshift_coordinator::{JobError, JobReport, outcome_json};

/// Exit code of a job that failed while running.
pub const EXIT_FAILED: u8 = 1;
/// Exit code of a spec, source, SQL or target error found before any task ran.
pub const EXIT_INVALID: u8 = 2;

pub fn exit_code(error: &JobError) -> u8 {
    match error {
        JobError::Invalid(_) => EXIT_INVALID,
        _ => EXIT_FAILED,
    }
}

pub fn report_json(report: &JobReport) -> String {
    outcome_json(&report.job_id, Ok(report)).to_string()
}

pub fn error_json(job_id: &str, error: &JobError) -> String {
    outcome_json(job_id, Err(error)).to_string()
}

pub fn report_text(report: &JobReport) -> String {
    let snapshot = match (report.snapshot_id, report.already_committed) {
        (Some(id), true) => format!("{id} (committed by an earlier run; nothing done)"),
        (Some(id), false) => id.to_string(),
        (None, _) => "none (the result was empty; nothing committed)".into(),
    };
    let table = match report.mode.as_str() {
        "overwrite" => format!(
            "{} (overwritten: the result replaced every row)",
            report.table
        ),
        "overwrite_partitions" => format!(
            "{} (the result replaced the partitions it has rows in)",
            report.table
        ),
        _ => report.table.clone(),
    };
    format!(
        "job {} succeeded\n  pipeline  {}\n  table     {}\n  snapshot  {}\n  rows      {}\n  files     {} ({})\n  stages    {} ({} tasks)\n  duration  {:.1} s\n",
        report.job_id,
        report.pipeline,
        table,
        snapshot,
        report.rows,
        report.files,
        HumanBytes(report.bytes),
        report.stages,
        report.tasks,
        report.duration_ms as f64 / 1000.0
    )
}
