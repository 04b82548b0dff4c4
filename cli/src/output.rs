//! Printing job reports: aligned text for people, one JSON object for scripts.

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
        _ => report.table.clone(),
    };
    format!(
        "job {} succeeded\n  pipeline  {}\n  table     {}\n  snapshot  {}\n  rows      {}\n  files     {} ({}){}\n  stages    {} ({} tasks)\n  duration  {:.1} s\n",
        report.job_id,
        report.pipeline,
        table,
        snapshot,
        report.rows,
        report.files,
        human_bytes(report.bytes),
        if report.partitions > 1 {
            format!(
                ", {} partitions, at most {} file(s) in one",
                report.partitions, report.max_files_per_partition
            )
        } else {
            String::new()
        },
        report.stages,
        report.tasks,
        report.duration_ms as f64 / 1000.0
    )
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
