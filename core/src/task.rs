//! Running one task on a worker: decode the stage plan, run the partition, write its output
//! (shuffle object or Iceberg data files) and describe the outcome as a `TaskResult`.
//!
//! Architecture invariant: a task attempt writes only under paths unique to that attempt,
//! so two runs of one task (a retry, a duplicate delivery) never mix their files.

use std::sync::Arc;
use std::time::Instant;

use ballista_core::execution_plans::{ShuffleWriter, ShuffleWriterExec, SortShuffleWriterExec};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use datafusion::prelude::SessionContext;
use nightshift_proto::PROTOCOL_VERSION;
use nightshift_proto::v1::{self, task_definition, task_result};
use tracing::{Instrument, info_span};

use crate::codec::decode_plan;
use crate::error::{CoreError, Result};
use crate::ids::JobId;
use crate::names::AttemptId;
use crate::shared_builds::{BuildLease, SharedBuilds};
use crate::shuffle::write_shuffle_output;
use crate::storage::Location;
use crate::table::write_data_files;

/// The result of `task` on `worker_id` as far as the task names it (job, stage, partition,
/// attempt, plan), without an outcome.
pub fn result_of(task: &v1::TaskDefinition, worker_id: &str) -> v1::TaskResult {
    v1::TaskResult {
        protocol_version: PROTOCOL_VERSION,
        job_id: task.job_id.clone(),
        stage_id: task.stage_id,
        partition: task.partition,
        attempt: task.attempt,
        worker_id: worker_id.to_string(),
        plan: task.plan.clone(),
        ..Default::default()
    }
}

/// Runs `task` and always returns a result; failures are described, not raised.
pub async fn run_task(
    task: &v1::TaskDefinition,
    session: &SessionContext,
    worker_id: &str,
) -> v1::TaskResult {
    let span = info_span!(
        "task",
        job_id = %task.job_id,
        stage = task.stage_id,
        task = task.partition,
        attempt = task.attempt,
    );
    let started = Instant::now();
    let outcome = execute(task, session).instrument(span).await;
    let mut result = v1::TaskResult {
        elapsed_ms: started.elapsed().as_millis() as u64,
        ..result_of(task, worker_id)
    };
    match outcome {
        Ok((rows, bytes, outcome)) => {
            result.rows = rows;
            result.bytes = bytes;
            result.outcome = Some(outcome);
        }
        Err((e, inputs, columns)) => {
            let mut message = name_csv_column(&clean_message(&e.to_string()), &columns);
            if let Some(line) = json_text_field_line(&message, &inputs) {
                message = format!("{message}; {line}");
            }
            if !inputs.is_empty() {
                message = format!("{message} (reading {})", inputs.join(", "));
            }
            result.outcome = Some(task_result::Outcome::Failed(v1::TaskFailed {
                message,
                retryable: e.is_retryable(),
            }));
        }
    }
    result
}

type Executed = (u64, u64, task_result::Outcome);
/// A task error with the files and the column names of the scan it was reading.
type Failure = (CoreError, Vec<String>, Vec<String>);

async fn execute(
    task: &v1::TaskDefinition,
    session: &SessionContext,
) -> std::result::Result<Executed, Failure> {
    if task.protocol_version != PROTOCOL_VERSION {
        return Err((
            CoreError::Protocol(format!(
                "task has protocol version {}, this worker speaks {PROTOCOL_VERSION}; run workers of the coordinator's build",
                task.protocol_version
            )),
            vec![],
            vec![],
        ));
    }
    let job = JobId::parse(&task.job_id).map_err(|e| (CoreError::Protocol(e), vec![], vec![]))?;
    let attempt = AttemptId::new(job, task.stage_id, task.partition, task.attempt);
    let ctx = session.task_ctx();
    let (input, partitioning) =
        decode_stage(&task.stage_plan, &ctx).map_err(|e| (e, vec![], vec![]))?;
    let (input, builds) =
        share_builds(&ctx, &task.job_id, task.stage_id, input).map_err(|e| (e, vec![], vec![]))?;
    let partition = task.partition as usize;
    let (inputs, columns) = scan_context(&input, partition);
    let plan = input.clone();
    let kind = match &task.output {
        Some(task_definition::Output::Table(_)) => crate::metrics::StageKind::Table,
        Some(task_definition::Output::Rows(_)) => crate::metrics::StageKind::Check,
        _ => crate::metrics::StageKind::Shuffle,
    };
    let run = async {
        match &task.output {
            Some(task_definition::Output::Shuffle(out)) => {
                let dir = Location::parse(&out.prefix, std::path::Path::new("/"))?
                    .join(&attempt.shuffle_dir());
                let written =
                    write_shuffle_output(input, partition, partitioning, &dir, ctx).await?;
                let segments = written.segments.iter().map(Into::into).collect();
                Ok((
                    written.rows,
                    written.bytes,
                    task_result::Outcome::Shuffle(v1::ShuffleWritten { segments }),
                ))
            }
            Some(task_definition::Output::Table(out)) => {
                let prefix = attempt.data_file_prefix();
                let written = write_data_files(input, partition, out, prefix, ctx).await?;
                Ok((
                    written.rows,
                    written.bytes,
                    task_result::Outcome::Files(v1::FilesWritten {
                        data_files_json: written.data_files_json,
                        checks: written.checks,
                        reject_files_json: written.reject_files_json,
                        rejected_rows: written.rejected_rows,
                        set_aside_partitions_json: written.set_aside_partitions_json,
                    }),
                ))
            }
            Some(task_definition::Output::Rows(out)) => {
                let stream = input.execute(partition, ctx)?;
                let returned = crate::checks::count_and_sample(stream, out).await?;
                Ok((returned.count, 0, task_result::Outcome::Returned(returned)))
            }
            None => Err(CoreError::Protocol("task has no output".into())),
        }
    };
    let executed = match run.await {
        Ok(executed) => executed,
        Err(e) => {
            builds.failed();
            return Err((e, inputs, columns));
        }
    };
    let (rows, bytes) = rows_and_bytes_read(&plan, builds.reused_build_sides());
    crate::metrics::task_read(kind, rows, bytes);
    Ok(executed)
}

/// `plan` with its broadcast joins' tables shared with the other tasks of the stage in this
/// process ([`crate::shared_builds`]), if the session carries the process's builds.
fn share_builds(
    ctx: &TaskContext,
    job: &str,
    stage: u32,
    plan: Arc<dyn ExecutionPlan>,
) -> Result<(Arc<dyn ExecutionPlan>, BuildLease)> {
    match ctx.session_config().get_extension::<SharedBuilds>() {
        Some(builds) => Ok(builds.share(job, stage, plan)?),
        None => Ok((plan, BuildLease::default())),
    }
}

/// Rows the plan's leaves (scans and shuffle readers) produced, and the bytes its scans read,
/// from the plan's execution metrics; `skip` are build sides another task read.
fn rows_and_bytes_read(
    plan: &Arc<dyn ExecutionPlan>,
    skip: &[Arc<dyn ExecutionPlan>],
) -> (u64, u64) {
    if skip.iter().any(|s| Arc::ptr_eq(s, plan)) {
        return (0, 0);
    }
    let children = plan.children();
    if children.is_empty() {
        let Some(metrics) = plan.metrics() else {
            return (0, 0);
        };
        let rows = metrics.output_rows().unwrap_or(0) as u64;
        let bytes = metrics
            .sum_by_name("bytes_scanned")
            .map_or(0, |v| v.as_usize() as u64);
        return (rows, bytes);
    }
    children
        .into_iter()
        .map(|child| rows_and_bytes_read(child, skip))
        .fold((0, 0), |(r, b), (r2, b2)| (r + r2, b + b2))
}

/// Deletes what a task attempt wrote (its shuffle object or its data files), for an attempt
/// whose result will never be taken. Returns how many objects were deleted.
pub async fn discard_output(result: &v1::TaskResult) -> Result<usize> {
    let paths: Vec<String> = match &result.outcome {
        Some(task_result::Outcome::Shuffle(written)) => {
            let mut paths: Vec<String> = written.segments.iter().map(|s| s.path.clone()).collect();
            paths.sort();
            paths.dedup();
            paths
        }
        Some(task_result::Outcome::Files(files)) => {
            let mut paths = crate::table::data_file_paths(&files.data_files_json);
            paths.extend(crate::table::data_file_paths(&files.reject_files_json));
            paths
        }
        _ => Vec::new(),
    };
    let locations = paths
        .iter()
        .map(|p| Location::parse(p, std::path::Path::new("/")))
        .collect::<Result<Vec<_>>>()?;
    crate::storage::delete_objects(&locations).await?;
    Ok(locations.len())
}

/// Decodes a stage plan and splits it into the plan to run and its shuffle partitioning.
fn decode_stage(
    bytes: &[u8],
    ctx: &TaskContext,
) -> Result<(Arc<dyn ExecutionPlan>, Option<Partitioning>)> {
    let plan = decode_plan(bytes, ctx)?;
    let writer: &dyn ShuffleWriter =
        if let Some(w) = plan.as_any().downcast_ref::<ShuffleWriterExec>() {
            w
        } else if let Some(w) = plan.as_any().downcast_ref::<SortShuffleWriterExec>() {
            w
        } else {
            return Err(CoreError::Protocol(format!(
                "stage plan root is {}, expected a shuffle writer",
                plan.name()
            )));
        };
    let input = writer.children()[0].clone();
    Ok((input, writer.shuffle_output_partitioning().cloned()))
}

/// The files that partition `partition` of the plan's scans read, and the columns of the
/// first scan, for error messages.
fn scan_context(plan: &Arc<dyn ExecutionPlan>, partition: usize) -> (Vec<String>, Vec<String>) {
    let mut files = Vec::new();
    let mut columns = Vec::new();
    collect_scan_context(plan, partition, &mut files, &mut columns);
    files.sort();
    files.dedup();
    (files, columns)
}

fn collect_scan_context(
    plan: &Arc<dyn ExecutionPlan>,
    partition: usize,
    out: &mut Vec<String>,
    columns: &mut Vec<String>,
) {
    if let Some(source) = plan.as_any().downcast_ref::<DataSourceExec>()
        && let Some(config) = source
            .data_source()
            .as_any()
            .downcast_ref::<FileScanConfig>()
        && let Some(group) = config.file_groups.get(partition)
    {
        if columns.is_empty() {
            columns.extend(
                config
                    .file_schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone()),
            );
        }
        for file in group.files() {
            let name = format!("/{}", file.object_meta.location);
            out.push(match &file.range {
                Some(r) => format!("{name} bytes {}..{}", r.start, r.end),
                None => name,
            });
        }
    }
    for child in plan.children() {
        collect_scan_context(child, partition, out, columns);
    }
}

/// Arrow's CSV reader reports "for column 3 at line 7": a 0-based column index and a 1-based
/// record number that does not count the header. Say which column and what the number means.
fn name_csv_column(message: &str, columns: &[String]) -> String {
    let Some(start) = message.find("for column ") else {
        return message.to_string();
    };
    let rest = &message[start + "for column ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let Ok(index) = digits.parse::<usize>() else {
        return message.to_string();
    };
    let after = &rest[digits.len()..];
    let Some(line_rest) = after.strip_prefix(" at line ") else {
        return message.to_string();
    };
    let line: String = line_rest.chars().take_while(char::is_ascii_digit).collect();
    let column = columns
        .get(index)
        .map_or_else(|| format!("#{}", index + 1), |name| format!("`{name}`"));
    format!(
        "{}for column {column} at record {line} (header not counted){}",
        &message[..start],
        &line_rest[line.len()..]
    )
}

/// Arrow's JSON reader fails a text column at a record holding a number or a boolean there
/// ("whilst decoding field 'id': expected string got 1") and names no line: inference made
/// the column text because other records hold text. Says which line of which input holds
/// the first such value, and what to do. Reads the task's local JSON inputs only on this
/// failure; `None` when the message is another or no line is found.
fn json_text_field_line(message: &str, inputs: &[String]) -> Option<String> {
    let field = message
        .split("whilst decoding field '")
        .nth(1)?
        .split("': expected string got ")
        .next()?;
    if !message.contains(&format!("'{field}': expected string got ")) {
        return None;
    }
    inputs.iter().find_map(|input| {
        let path = input.split(" bytes ").next()?;
        let file = crate::access::open_local(std::path::Path::new(path)).ok()?;
        let (line, value) = first_non_text_value(std::io::BufReader::new(file), field)?;
        Some(format!(
            "{path} line {line}: `{field}` holds {value} where the column is text (other records hold text there): a JSON field must hold one kind of value; write it as text (\"{value}\"), or give numbers a field of their own"
        ))
    })
}

/// The first line (1-based) of newline-delimited JSON whose `field` holds a number or a
/// boolean, and that value.
fn first_non_text_value(reader: impl std::io::BufRead, field: &str) -> Option<(usize, String)> {
    reader.lines().enumerate().find_map(|(i, line)| {
        let value: serde_json::Value = serde_json::from_str(&line.ok()?).ok()?;
        match value.get(field)? {
            v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => {
                Some((i + 1, v.to_string()))
            }
            _ => None,
        }
    })
}

/// Strips DataFusion's nested "External error: Execution error:" prefixes and the trailing
/// backtrace hint so a message reads as one sentence.
pub fn clean_message(message: &str) -> String {
    const PREFIXES: &[&str] = &[
        "External error: ",
        "Execution error: ",
        "Arrow error: ",
        "Parser error: ",
        "Error during planning: ",
        "Schema error: ",
        "Context(",
        "Object Store error: ",
        "Shared(",
    ];
    let mut text = message.trim();
    loop {
        let before = text;
        for p in PREFIXES {
            if let Some(rest) = text.strip_prefix(p) {
                text = rest.trim_start();
            }
        }
        if before == text {
            break;
        }
    }
    text.split("\n\nbacktrace")
        .next()
        .unwrap_or(text)
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_number_in_a_text_column_is_found_by_line() {
        let lines = "{\"id\": \"a\"}\n\n{\"id\": null}\n{\"other\": 1}\n{\"id\": 17, \"x\": 1}\n{\"id\": true}\n";
        assert_eq!(
            first_non_text_value(lines.as_bytes(), "id"),
            Some((5, "17".to_string()))
        );
        assert_eq!(
            first_non_text_value(lines.as_bytes(), "x"),
            Some((5, "1".into()))
        );
        assert_eq!(
            first_non_text_value("{\"id\": \"a\"}\n".as_bytes(), "id"),
            None
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d.json");
        std::fs::write(&file, "{\"id\": \"X-1\"}\n{\"id\": 2}\n").unwrap();
        let inputs = [format!("{} bytes 0..30", file.display())];
        let message = "Json error: whilst decoding field 'id': expected string got 2";
        let line = json_text_field_line(message, &inputs).unwrap();
        assert!(
            line.starts_with(&format!(
                "{} line 2: `id` holds 2 where the column is text",
                file.display()
            )),
            "{line}"
        );
        assert_eq!(json_text_field_line("Csv error: something", &inputs), None);
        assert_eq!(json_text_field_line(message, &[]), None);
    }
}
