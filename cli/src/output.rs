//! Printing job reports: aligned text for people, one JSON object for scripts.

use indicatif::HumanBytes;
use nightshift_coordinator::{JobError, JobReport, outcome_json};
use nightshift_core::checks::CheckResult;

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
    let text = format!(
        "job {} succeeded\n  pipeline  {}\n  table     {}\n  snapshot  {}\n  rows      {}\n  files     {} ({}){}\n  stages    {} ({} tasks)\n  duration  {:.1} s\n",
        report.job_id,
        report.pipeline,
        table,
        snapshot,
        report.rows,
        report.files,
        HumanBytes(report.bytes),
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
    );
    text + &rejects_text(report) + &checks_text(&report.checks)
}

/// Where the quarantined rows went, when a check set rows aside.
fn rejects_text(report: &JobReport) -> String {
    if report.rejected_rows == 0 && report.rejects_snapshot_id.is_none() {
        return String::new();
    }
    let table = nightshift_spec::rejects_table(&report.table);
    match report.rejects_snapshot_id {
        Some(id) => format!(
            "  rejects   {} rows set aside in {table} (snapshot {id})
",
            report.rejected_rows
        ),
        None => format!(
            "  rejects   {} rows set aside
",
            report.rejected_rows
        ),
    }
}

/// The checks' verdicts: a count, then a line per failed (warning) check with its samples.
fn checks_text(checks: &[CheckResult]) -> String {
    if checks.is_empty() {
        return String::new();
    }
    let failed: Vec<&CheckResult> = checks.iter().filter(|c| !c.passed).collect();
    let quarantined = failed.iter().filter(|c| c.quarantined).count();
    let mut text = format!(
        "  checks    {} passed, {} failed{}\n",
        checks.len() - failed.len(),
        failed.len() - quarantined,
        if quarantined > 0 {
            format!(", {quarantined} set rows aside")
        } else {
            String::new()
        }
    );
    for check in failed {
        let severity = if check.quarantined {
            "quarantined"
        } else {
            check.severity.as_str()
        };
        text.push_str(&format!(
            "    {} ({severity}): {}\n",
            check.name, check.detail
        ));
        for sample in &check.samples {
            text.push_str(&format!("      e.g. {sample}\n"));
        }
    }
    text
}

/// `nightshift dlq list`: one line per dead-lettered task.
pub fn dead_letters_text(letters: &[crate::cluster::DeadLetter]) -> String {
    if letters.is_empty() {
        return "no dead-lettered tasks\n".into();
    }
    let mut out = format!(
        "{:<38} {:>5} {:>5} {:>7} {:>10}  {:<15} {:<10} last error\n",
        "job", "stage", "task", "attempt", "deliveries", "reason", "job state"
    );
    for l in letters {
        let deliveries = l.task.deliveries.map_or("?".into(), |d| d.to_string());
        out.push_str(&format!(
            "{:<38} {:>5} {:>5} {:>7} {:>10}  {:<15} {:<10} {}\n",
            l.task.job_id,
            l.task.stage,
            l.task.partition,
            l.task.attempt,
            deliveries,
            l.task.reason,
            l.job_state,
            l.last_error
        ));
    }
    out
}

/// `nightshift dlq replay`: what moved and what stayed.
pub fn replayed_text(replayed: &crate::cluster::Settled) -> String {
    let mut out = format!("requeued {} task(s)\n", replayed.done.len());
    for l in &replayed.done {
        out.push_str(&format!(
            "  job {} stage {} task {} attempt {}\n",
            l.task.job_id, l.task.stage, l.task.partition, l.task.attempt
        ));
    }
    let mut ended: Vec<(&str, &str)> = replayed
        .kept
        .iter()
        .map(|l| (l.task.job_id.as_str(), l.job_state.as_str()))
        .collect();
    ended.sort();
    ended.dedup();
    for (job, state) in ended {
        let tasks = replayed
            .kept
            .iter()
            .filter(|l| l.task.job_id == job)
            .count();
        out.push_str(&format!(
            "kept {tasks} task(s) of job {job}: the job has {state}; run it again with --job-id {job}\n"
        ));
    }
    out
}

/// What `nightshift dlq purge` did: the tasks removed, and those kept because their job may
/// still want them.
pub fn purged_text(purged: &crate::cluster::Settled) -> String {
    let mut out = format!("removed {} task(s)\n", purged.done.len());
    for l in &purged.done {
        out.push_str(&format!(
            "  job {} ({}) stage {} task {} attempt {}\n",
            l.task.job_id, l.job_state, l.task.stage, l.task.partition, l.task.attempt
        ));
    }
    for l in &purged.kept {
        out.push_str(&format!(
            "kept job {} stage {} task {}: the job is {}; replay it with `nightshift dlq replay {}`\n",
            l.task.job_id, l.task.stage, l.task.partition, l.job_state, l.task.job_id
        ));
    }
    out
}
