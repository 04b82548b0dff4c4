//! `[[check]]` on the published rows: counted by the tasks that write them, merged and judged
//! by the coordinator before its commit.
//!
//! A row-level check is one SQL predicate ([`nightshift_spec::CheckSpec::row_predicate`]); each
//! final-stage task evaluates it on every batch it writes ([`RowCheckCounter`]) and reports
//! the failing count with a few sample rows in its result. The coordinator sums the outcomes
//! of the winning attempts ([`judge`]): an error-severity failure fails the job before the
//! commit, so nothing is published; a warning is reported and the rows are published. No
//! row travels to the coordinator except the samples.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::common::{DFSchema, DataFusionError};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use nightshift_proto::v1;
use nightshift_spec::{CheckKind, CheckSpec, Severity, WriteMode};

use crate::error::{CoreError, Result};

/// Failing rows a task keeps per check as samples, and the report keeps per check.
pub const SAMPLES: usize = 5;

/// The row-level checks of `checks`, as the writing tasks receive them, for result rows of
/// `schema`. Fails when a check on the result does not fit its columns' types
/// ([`CheckSpec::typed_row_predicate`], [`CheckSpec::check_types`]).
pub fn row_checks(checks: &[CheckSpec], schema: &Schema) -> Result<Vec<v1::RowCheck>> {
    let type_of = types_of(schema);
    let mut row_checks = Vec::new();
    for check in checks.iter().filter(|c| c.on_result()) {
        let predicate =
            check
                .typed_row_predicate(&type_of)
                .map_err(|message| CoreError::Target {
                    table: "result".to_string(),
                    message,
                })?;
        if let Some(predicate_sql) = predicate {
            row_checks.push(v1::RowCheck {
                name: check.name.clone(),
                predicate_sql,
                quarantine: check.quarantines(),
            });
        }
    }
    Ok(row_checks)
}

/// The type of a column of `schema` by name.
fn types_of(schema: &Schema) -> impl Fn(&str) -> Option<DataType> + '_ {
    |column| {
        schema
            .field_with_name(column)
            .ok()
            .map(|f| f.data_type().clone())
    }
}

/// The query a check on a source runs, typed by the source as `ctx` registered it
/// ([`CheckSpec::typed_source_query`]); `None` when the check has none.
pub async fn source_check_query(ctx: &SessionContext, check: &CheckSpec) -> Result<Option<String>> {
    let schema = match ctx.table_provider(check.on.as_str()).await {
        Ok(provider) => provider.schema(),
        // Not registered: the query's planning names the missing source.
        Err(_) => return Ok(check.source_query(&check.on)),
    };
    check
        .typed_source_query(&check.on, &types_of(&schema))
        .map_err(|message| CoreError::Target {
            table: check.on.clone(),
            message,
        })
}

/// Counts, as batches go by, the rows that fail each check.
pub struct RowCheckCounter {
    checks: Vec<Counted>,
}

/// One row check as tasks apply it: its predicate, the rows it failed and a few of them.
pub(crate) struct Counted {
    pub(crate) name: String,
    pub(crate) predicate: Arc<dyn PhysicalExpr>,
    failed: u64,
    samples: Vec<String>,
}

impl Counted {
    pub(crate) fn new(name: &str, predicate: Arc<dyn PhysicalExpr>) -> Self {
        Counted {
            name: name.to_string(),
            predicate,
            failed: 0,
            samples: Vec::new(),
        }
    }

    /// True for each row of `batch` the predicate is false on.
    pub(crate) fn failing(&self, batch: &RecordBatch) -> Result<BooleanArray> {
        failing_rows_of(&self.name, &self.predicate, batch)
    }

    /// Counts the `rows` of `batch` that failed, keeping the first few as samples.
    pub(crate) fn record(&mut self, batch: &RecordBatch, rows: &[u32]) -> Result<()> {
        self.failed += rows.len() as u64;
        let room = SAMPLES.saturating_sub(self.samples.len()).min(rows.len());
        if room > 0 {
            let take = UInt32Array::from(rows[..room].to_vec());
            self.samples.extend(sample_rows(batch, &take)?);
        }
        Ok(())
    }

    pub(crate) fn outcome(self) -> v1::CheckOutcome {
        v1::CheckOutcome {
            name: self.name,
            failed: self.failed,
            samples: self.samples,
        }
    }
}

impl RowCheckCounter {
    /// Compiles `checks` against the rows' `schema`; an error names the check and the column
    /// or function it could not resolve.
    pub fn new(checks: &[v1::RowCheck], schema: &SchemaRef) -> Result<Self> {
        // Every final-stage task builds one: without checks it must cost nothing (a
        // session context registers every SQL function).
        if checks.is_empty() {
            return Ok(RowCheckCounter { checks: Vec::new() });
        }
        let checks = compile_row_checks(checks, schema)?
            .into_iter()
            .map(|(check, predicate)| Counted::new(&check.name, predicate))
            .collect();
        Ok(RowCheckCounter { checks })
    }

    /// Counts the rows of `batch` for which a predicate is false (NULL passes).
    pub fn observe(&mut self, batch: &RecordBatch) -> Result<()> {
        for check in &mut self.checks {
            let failing = check.failing(batch)?;
            let failing: Vec<u32> = (0..failing.len())
                .filter(|&i| failing.value(i))
                .map(|i| i as u32)
                .collect();
            check.record(batch, &failing)?;
        }
        Ok(())
    }

    /// Each check's failing count and samples, in the order given.
    pub fn finish(self) -> Vec<v1::CheckOutcome> {
        self.checks.into_iter().map(Counted::outcome).collect()
    }
}

/// Compiles each check's predicate against the rows' `schema`; an error names the check and
/// the column or function it could not resolve.
pub(crate) fn compile_row_checks<'c>(
    checks: &'c [v1::RowCheck],
    schema: &SchemaRef,
) -> Result<Vec<(&'c v1::RowCheck, Arc<dyn PhysicalExpr>)>> {
    if checks.is_empty() {
        return Ok(Vec::new());
    }
    let ctx = SessionContext::new();
    let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
    checks
        .iter()
        .map(|check| {
            let compiled = ctx
                .parse_sql_expr(&check.predicate_sql, &df_schema)
                .and_then(|expr| crate::checked_integers::checked(expr, &df_schema))
                .and_then(|expr| ctx.create_physical_expr(expr, &df_schema));
            let predicate = compiled.map_err(|e| CoreError::Target {
                table: "result".to_string(),
                message: format!("[[check]] `{}`: {e}", check.name),
            })?;
            Ok((check, predicate))
        })
        .collect()
}

/// True for each row of `batch` the check `name`'s `predicate` is false on (NULL passes,
/// as in a SQL CHECK constraint).
pub(crate) fn failing_rows_of(
    name: &str,
    predicate: &Arc<dyn PhysicalExpr>,
    batch: &RecordBatch,
) -> Result<BooleanArray> {
    let value = predicate.evaluate(batch)?.into_array(batch.num_rows())?;
    let Some(passed) = value.as_any().downcast_ref::<BooleanArray>() else {
        return Err(CoreError::Target {
            table: "result".to_string(),
            message: format!("[[check]] `{name}` is not a true/false test"),
        });
    };
    Ok((0..passed.len())
        .map(|i| Some(passed.is_valid(i) && !passed.value(i)))
        .collect())
}

/// The checks of `checks` on all the result's rows together, each with its query over
/// `result` ([`CheckSpec::set_query`]).
pub fn result_set_queries(checks: &[CheckSpec]) -> Vec<(&CheckSpec, String)> {
    checks
        .iter()
        .filter(|c| c.on_result())
        .filter_map(|c| c.set_query().map(|q| (c, q)))
        .collect()
}

/// Runs the checks on all the rows together (`unique`, `sql`, `freshness`, `relationship`:
/// [`CheckSpec::set_query`]) over the job's written, not yet committed data files
/// (`file_paths`, rows of `schema`), as the table `result`. Each query's rows are the
/// failures: their number (for `unique` and `relationship`, the rows holding the keys found)
/// with a few samples. This reads the result once more, in the process that commits; with
/// no such check it reads nothing.
///
/// A `relationship` check reads its `to` table's current snapshot from `catalog`.
pub async fn run_set_checks(
    checks: &[CheckSpec],
    file_paths: &[String],
    schema: &SchemaRef,
    catalog: Option<&dyn iceberg::Catalog>,
) -> Result<Vec<v1::CheckOutcome>> {
    let queries = result_set_queries(checks);
    if queries.is_empty() {
        return Ok(Vec::new());
    }
    let ctx = crate::session::new_session(crate::session::SessionOptions::default());
    ctx.register_table(
        "result",
        crate::sources::parquet_files_table(file_paths, schema)?,
    )?;
    run_check_queries(&ctx, &queries, catalog, true).await
}

/// Runs each check on a source (`on = "<source>"`) in `ctx`, where the sources are
/// registered as the job reads them: the rows each query returns are the failures (for
/// `row_count`, the outcome's `failed` holds the source's row count). With `execute`
/// false the queries are only planned: a column or table that does not exist is an error,
/// and no data is read (`validate`, admission).
pub async fn run_source_checks(
    ctx: &SessionContext,
    checks: &[CheckSpec],
    catalog: Option<&dyn iceberg::Catalog>,
    execute: bool,
) -> Result<Vec<v1::CheckOutcome>> {
    let mut queries: Vec<(&CheckSpec, String)> = Vec::new();
    for check in checks.iter().filter(|c| !c.on_result()) {
        if let Some(query) = source_check_query(ctx, check).await? {
            queries.push((check, query));
        }
    }
    run_check_queries(ctx, &queries, catalog, execute).await
}

async fn run_check_queries(
    ctx: &SessionContext,
    queries: &[(&CheckSpec, String)],
    catalog: Option<&dyn iceberg::Catalog>,
    execute: bool,
) -> Result<Vec<v1::CheckOutcome>> {
    let mut outcomes = Vec::with_capacity(queries.len());
    for (check, query) in queries {
        let failed = |message: String| CoreError::Target {
            table: check.on.clone(),
            message: format!("[[check]] `{}`: {message}", check.name),
        };
        let failed_query = |e: DataFusionError| failed(e.to_string());
        if let Some(to) = &check.to {
            crate::sources::register_table_snapshot(
                ctx,
                nightshift_spec::RELATIONSHIP_VIEW,
                to,
                catalog,
            )
            .await
            .map_err(|e| {
                failed(match e {
                    CoreError::Source { message, .. } => message,
                    other => other.to_string(),
                })
            })?;
        }
        let frame = crate::planner::spec_query(ctx, query)
            .await
            .map_err(failed_query)?;
        if !execute {
            continue;
        }
        let mut stream = frame.execute_stream().await.map_err(failed_query)?;
        let mut outcome = v1::CheckOutcome {
            name: check.name.clone(),
            failed: 0,
            samples: Vec::new(),
        };
        while let Some(batch) = futures::StreamExt::next(&mut stream).await {
            let batch = batch.map_err(failed_query)?;
            outcome.failed += failing_rows(check, &batch);
            let room = SAMPLES
                .saturating_sub(outcome.samples.len())
                .min(batch.num_rows());
            if room > 0 {
                let take = UInt32Array::from((0..room as u32).collect::<Vec<_>>());
                outcome.samples.extend(sample_rows(&batch, &take)?);
            }
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Counts the rows of a check query's partition (`stream`) and keeps the first few as
/// samples: what a task with a [`v1::RowsOutput`] returns.
pub async fn count_and_sample(
    mut stream: datafusion::physical_plan::SendableRecordBatchStream,
    out: &v1::RowsOutput,
) -> Result<v1::RowsReturned> {
    let mut returned = v1::RowsReturned::default();
    while let Some(batch) = futures::StreamExt::next(&mut stream).await {
        let batch = batch?;
        returned.count += rows_stood_for(&batch, &out.count_column);
        let room = (out.samples as usize)
            .saturating_sub(returned.samples.len())
            .min(batch.num_rows());
        if room > 0 {
            let take = UInt32Array::from((0..room as u32).collect::<Vec<_>>());
            returned.samples.extend(sample_rows(&batch, &take)?);
        }
    }
    Ok(returned)
}

/// The rows `batch` stands for: the sum of its `count_column` (a key and how many rows hold
/// it), or one per row when that is empty or missing.
fn rows_stood_for(batch: &RecordBatch, count_column: &str) -> u64 {
    if count_column.is_empty() {
        return batch.num_rows() as u64;
    }
    batch
        .column_by_name(count_column)
        .and_then(|c| c.as_any().downcast_ref::<arrow::array::Int64Array>())
        .map(|counts| counts.iter().flatten().map(|n| n.max(0) as u64).sum())
        .unwrap_or(batch.num_rows() as u64)
}

/// The column whose values a check query's rows stand for ([`rows_stood_for`]): `unique`
/// and `relationship` return keys with the count of rows holding each; `row_count` on a
/// source, one row with the count; the others, one failing row per row.
pub fn count_column(check: &CheckSpec) -> &'static str {
    match check.kind {
        CheckKind::Unique | CheckKind::Relationship => nightshift_spec::DUPLICATE_ROWS_COLUMN,
        CheckKind::RowCount => nightshift_spec::ROWS_COUNTED_COLUMN,
        _ => "",
    }
}

/// The rows a batch of a set check's query stands for: one per row, except `unique` and
/// `relationship`, whose rows are keys with the count of rows holding each.
fn failing_rows(check: &CheckSpec, batch: &RecordBatch) -> u64 {
    rows_stood_for(batch, count_column(check))
}

/// The rows of `batch` at `indices`, each as a JSON object.
pub(crate) fn sample_rows(batch: &RecordBatch, indices: &UInt32Array) -> Result<Vec<String>> {
    let columns = batch
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, indices, None))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(arrow_error)?;
    let rows = RecordBatch::try_new(batch.schema(), columns).map_err(arrow_error)?;
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    writer.write(&rows).map_err(arrow_error)?;
    writer.finish().map_err(arrow_error)?;
    let json: Vec<serde_json::Value> =
        serde_json::from_slice(&writer.into_inner()).unwrap_or_default();
    Ok(json.iter().map(serde_json::Value::to_string).collect())
}

/// An Arrow error as ours.
pub(crate) fn arrow_error(e: arrow::error::ArrowError) -> CoreError {
    CoreError::from(DataFusionError::from(e))
}

/// One check's verdict over the whole job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub severity: String,
    pub passed: bool,
    /// Rows that failed (row-level checks), or the rows written (`row_count`).
    pub failed_rows: u64,
    /// What was tested and what was found, in words.
    pub detail: String,
    /// Some failing rows, as JSON objects.
    pub samples: Vec<String>,
    /// The failing rows went to the rejects table (`on_fail = "quarantine"`): reported, never
    /// blocking.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quarantined: bool,
}

/// Judges every check of the job from the winning tasks' `outcomes` and the `rows` written;
/// `previous_rows` is what the pipeline's previous run published (`row_count`'s
/// `max_change`), if there was one.
pub fn judge<'a>(
    checks: &[CheckSpec],
    outcomes: impl IntoIterator<Item = &'a v1::CheckOutcome>,
    rows: u64,
    previous_rows: Option<u64>,
) -> Vec<CheckResult> {
    let outcomes: Vec<&v1::CheckOutcome> = outcomes.into_iter().collect();
    checks
        .iter()
        .map(|check| {
            let severity = check.severity.to_string();
            let mine = outcomes.iter().filter(|o| o.name == check.name);
            if check.kind == CheckKind::RowCount {
                // On a source, its query counted the source's rows.
                let counted = if check.on_result() {
                    rows
                } else {
                    mine.clone().map(|o| o.failed).sum()
                };
                let (passed, mut detail) = judge_row_count(check, counted, previous_rows);
                if !check.on_result() {
                    detail = format!(
                        "source `{}`: {}",
                        check.on,
                        detail.replacen("rows written", "rows read", 1)
                    );
                }
                return CheckResult {
                    name: check.name.clone(),
                    severity,
                    passed,
                    failed_rows: if passed { 0 } else { counted },
                    detail,
                    samples: Vec::new(),
                    quarantined: false,
                };
            }
            let failed: u64 = mine.clone().map(|o| o.failed).sum();
            let samples: Vec<String> = mine
                .flat_map(|o| o.samples.iter().cloned())
                .take(SAMPLES)
                .collect();
            // A source's row count is not known here; the result's is.
            let of_rows = if check.on_result() {
                format!(" of {rows}")
            } else {
                String::new()
            };
            let detail = match check.kind {
                CheckKind::Unique => format!(
                    "{failed}{of_rows} rows share their ({}) with another row",
                    check.columns.join(", ")
                ),
                CheckKind::Sql => format!(
                    "{failed} rows returned by {}",
                    check.sql.as_deref().unwrap_or_default().trim()
                ),
                CheckKind::Relationship => format!(
                    "{failed}{of_rows} rows have a ({}) that {} lacks",
                    check.columns.join(", "),
                    check.to.as_deref().unwrap_or_default()
                ),
                CheckKind::Freshness if failed == 0 => format!(
                    "the newest {} is not older than {}",
                    check.columns.join(", "),
                    check.max_age.as_deref().unwrap_or_default()
                ),
                CheckKind::Freshness => format!(
                    "the newest {} is older than {}, or no row has one (all NULL)",
                    check.columns.join(", "),
                    check.max_age.as_deref().unwrap_or_default()
                ),
                _ if check.quarantines() => format!(
                    "{failed} rows set aside in the rejects table: they fail {}",
                    check.row_predicate().unwrap_or_default()
                ),
                _ => format!(
                    "{failed}{of_rows} rows fail {}",
                    check.row_predicate().unwrap_or_default()
                ),
            };
            let detail = if check.on_result() {
                detail
            } else {
                format!("source `{}`: {detail}", check.on)
            };
            CheckResult {
                name: check.name.clone(),
                severity,
                passed: failed == 0,
                failed_rows: failed,
                detail,
                samples,
                quarantined: check.quarantines(),
            }
        })
        .collect()
}

/// `row_count`'s verdict and its words: the absolute bounds, and the change from the
/// previous run's rows within `max_change` (passing when there is no previous run, or it
/// published nothing: there is nothing to compare with).
fn judge_row_count(check: &CheckSpec, rows: u64, previous: Option<u64>) -> (bool, String) {
    let (min, max) = check.row_bounds();
    let mut passed = min.is_none_or(|m| rows >= m) && max.is_none_or(|m| rows <= m);
    let mut detail = format!("{rows} rows written");
    let expected = match (min, max) {
        (Some(a), Some(b)) => Some(format!("between {a} and {b}")),
        (Some(a), None) => Some(format!("at least {a}")),
        (None, Some(b)) => Some(format!("at most {b}")),
        (None, None) => None,
    };
    if let Some(expected) = expected {
        detail.push_str(&format!(", {expected} rows expected"));
    }
    if let Some(percent) = check.max_change_percent() {
        match previous {
            Some(before) if before > 0 => {
                let change = (rows as f64 - before as f64) / before as f64 * 100.0;
                passed &= change.abs() <= percent;
                detail.push_str(&format!(
                    "; the previous run published {before} ({change:+.1} %), within ±{percent} % expected"
                ));
            }
            _ => detail.push_str("; no previous run with rows to compare with"),
        }
    }
    (passed, detail)
}

/// The failed checks of error severity, which stop the commit.
pub fn blocking(results: &[CheckResult]) -> Vec<&CheckResult> {
    results
        .iter()
        .filter(|r| !r.passed && !r.quarantined && r.severity == Severity::Error.to_string())
        .collect()
}

/// Why a run must not commit although no check blocks it: an overwrite (`mode`) whose every
/// row (`rejected` of them, `rows` left) a check quarantined would replace the table's rows
/// with none, and an `overwrite_partitions` every partition it loaded (a partition's rows
/// set aside are replaced as its published ones are). `None`: it may commit.
pub fn quarantine_would_empty(mode: WriteMode, rows: u64, rejected: u64) -> Option<String> {
    let emptied = match mode {
        WriteMode::Overwrite => "the table",
        WriteMode::OverwritePartitions => "every partition it loaded",
        _ => return None,
    };
    (rows == 0 && rejected > 0).then(|| {
        format!(
            "checks quarantined every one of the {rejected} row(s) this run produced; an \
             overwrite would leave {emptied} empty, so nothing was committed, to the table or \
             to its rejects table: fix the input and run again"
        )
    })
}

/// The failed checks in words, one per line with its samples, for the job's error.
pub fn describe_failures(failed: &[&CheckResult]) -> String {
    failed
        .iter()
        .map(|r| {
            let mut line = format!("check `{}` failed: {}", r.name, r.detail);
            if !r.samples.is_empty() {
                line.push_str(&format!("; e.g. {}", r.samples.join(", ")));
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    /// Freshness finds no newest value in rows that are all NULL (it passed, "not older"); an
    /// empty result, and a fresh value, pass.
    #[tokio::test]
    async fn freshness_fails_rows_whose_every_value_is_null() {
        use arrow::array::TimestampMicrosecondArray;
        let check = &spec_checks(
            "[[check]]\nname = \"f\"\ntype = \"freshness\"\ncolumns = [\"at\"]\nmax_age = \"36h\"\n",
        )[0];
        let query = check.set_query().unwrap();
        let now = chrono::Utc::now().timestamp_micros();
        let failures = |values: Vec<Option<i64>>| {
            let query = query.clone();
            async move {
                let schema = Arc::new(Schema::new(vec![Field::new(
                    "at",
                    DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
                    true,
                )]));
                let batch = RecordBatch::try_new(
                    schema,
                    vec![Arc::new(TimestampMicrosecondArray::from(values))],
                )
                .unwrap();
                let ctx = SessionContext::new();
                ctx.register_batch("result", batch).unwrap();
                let rows: usize = ctx
                    .sql(&query)
                    .await
                    .unwrap()
                    .collect()
                    .await
                    .unwrap()
                    .iter()
                    .map(RecordBatch::num_rows)
                    .sum();
                rows
            }
        };
        assert_eq!(failures(vec![None, None]).await, 1);
        assert_eq!(failures(vec![None, Some(now)]).await, 0);
        assert_eq!(failures(vec![Some(now - 48 * 3_600_000_000)]).await, 1);
        assert_eq!(failures(vec![]).await, 0);
    }

    fn spec_checks(text: &str) -> Vec<CheckSpec> {
        #[derive(serde::Deserialize)]
        struct Checks {
            check: Vec<CheckSpec>,
        }
        toml::from_str::<Checks>(text).unwrap().check
    }

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("status", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![Some(1), None, Some(-3), Some(4)])),
                Arc::new(StringArray::from(vec![
                    Some("open"),
                    Some("shut"),
                    None,
                    Some("open"),
                ])),
            ],
        )
        .unwrap()
    }

    const CHECKS: &str = r#"
[[check]]
name = "id_present"
type = "not_null"
columns = ["id"]

[[check]]
name = "id_positive"
type = "range"
columns = ["id"]
min = 0
severity = "warn"

[[check]]
name = "known_status"
type = "accepted_values"
columns = ["status"]
values = ["open", "closed"]

[[check]]
name = "status_letters"
type = "regex"
columns = ["status"]
pattern = "^[a-z]+$"

[[check]]
name = "some_rows"
type = "row_count"
min = 10
"#;

    #[test]
    fn tasks_count_failing_rows_and_the_coordinator_judges() {
        let checks = spec_checks(CHECKS);
        let data = batch();
        let mut counter = RowCheckCounter::new(
            &row_checks(&checks, &data.schema()).unwrap(),
            &data.schema(),
        )
        .unwrap();
        // Two tasks' worth of the same rows.
        counter.observe(&data).unwrap();
        counter.observe(&data).unwrap();
        let outcomes = counter.finish();
        let failed: Vec<(&str, u64)> = outcomes
            .iter()
            .map(|o| (o.name.as_str(), o.failed))
            .collect();
        // NULL passes every check but not_null.
        assert_eq!(
            failed,
            [
                ("id_present", 2),
                ("id_positive", 2),
                ("known_status", 2),
                ("status_letters", 0)
            ]
        );
        assert_eq!(outcomes[0].samples[0], r#"{"status":"shut"}"#);
        let results = judge(&checks, &outcomes, 8, None);
        let names: Vec<&str> = blocking(&results).iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["id_present", "known_status", "some_rows"]);
        let text = describe_failures(&blocking(&results));
        assert_eq!(
            text,
            "check `id_present` failed: 2 of 8 rows fail \"id\" IS NOT NULL; e.g. {\"status\":\"shut\"}, {\"status\":\"shut\"}\n\
             check `known_status` failed: 2 of 8 rows fail \"status\" IN ('open', 'closed'); e.g. {\"status\":\"shut\"}, {\"status\":\"shut\"}\n\
             check `some_rows` failed: 8 rows written, at least 10 rows expected"
        );
        assert!(
            results
                .iter()
                .find(|r| r.name == "id_positive")
                .is_some_and(|r| !r.passed)
        );
    }

    #[test]
    fn an_overwrite_of_only_quarantined_rows_is_refused() {
        let refused = quarantine_would_empty(WriteMode::Overwrite, 0, 3).unwrap();
        assert!(refused.contains("every one of the 3 row(s)"), "{refused}");
        assert_eq!(quarantine_would_empty(WriteMode::Overwrite, 1, 3), None);
        // Nothing quarantined: an empty overwrite is what the input says.
        assert_eq!(quarantine_would_empty(WriteMode::Overwrite, 0, 0), None);
        // Every partition a partition overwrite loaded would be emptied.
        let refused = quarantine_would_empty(WriteMode::OverwritePartitions, 0, 3).unwrap();
        assert!(
            refused.contains("every partition it loaded empty"),
            "{refused}"
        );
        assert_eq!(
            quarantine_would_empty(WriteMode::OverwritePartitions, 1, 3),
            None
        );
        for mode in [WriteMode::Append, WriteMode::Merge] {
            assert_eq!(quarantine_would_empty(mode, 0, 3), None);
        }
    }

    #[test]
    fn a_quarantining_check_reports_its_rows_and_never_blocks() {
        let checks = spec_checks(
            "[[check]]\nname = \"known\"\ntype = \"accepted_values\"\ncolumns = [\"status\"]\nvalues = [\"open\"]\non_fail = \"quarantine\"\n",
        );
        let outcome = v1::CheckOutcome {
            name: "known".into(),
            failed: 2,
            samples: vec![],
        };
        let results = judge(&checks, [&outcome], 6, None);
        assert!(!results[0].passed && results[0].quarantined);
        assert_eq!(results[0].severity, "error");
        assert_eq!(
            results[0].detail,
            "2 rows set aside in the rejects table: they fail \"status\" IN ('open')"
        );
        assert!(blocking(&results).is_empty());
    }

    #[test]
    fn row_count_against_the_previous_run() {
        let checks = spec_checks(
            "[[check]]\nname = \"steady\"\ntype = \"row_count\"\nmax_change = \"30%\"\nmin = 1\n",
        );
        let verdict = |rows, previous| {
            let r = &judge(&checks, std::iter::empty(), rows, previous)[0];
            (r.passed, r.detail.clone())
        };
        assert_eq!(
            verdict(130, Some(100)),
            (
                true,
                "130 rows written, at least 1 rows expected; the previous run published 100 (+30.0 %), within ±30 % expected".to_string()
            )
        );
        assert!(!verdict(131, Some(100)).0);
        assert!(!verdict(69, Some(100)).0);
        assert!(verdict(70, Some(100)).0);
        assert_eq!(
            verdict(5, None),
            (
                true,
                "5 rows written, at least 1 rows expected; no previous run with rows to compare with"
                    .to_string()
            )
        );
        assert!(verdict(5, Some(0)).0);
        // The absolute bound still holds.
        assert!(!verdict(0, None).0);
    }

    /// A check's `sql` is a query: DataFusion would run `CREATE EXTERNAL TABLE` while
    /// planning and `COPY ... TO` when executed, reading and writing any file the process
    /// can (a submitter of the job API could copy the coordinator's files into a location
    /// it may read). Both are refused, and nothing is written.
    #[tokio::test]
    async fn a_check_that_defines_a_table_or_writes_a_file_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret.csv");
        std::fs::write(&secret, "k\n42\n").unwrap();
        let copied = dir.path().join("copied.csv");
        let schema = batch().schema();
        for sql in [
            format!(
                "COPY (SELECT 1 AS a) TO '{}' STORED AS CSV",
                copied.display()
            ),
            format!(
                "CREATE EXTERNAL TABLE stolen STORED AS CSV LOCATION '{}'",
                secret.display()
            ),
            "SET datafusion.execution.batch_size = 1".to_string(),
        ] {
            let checks = spec_checks(&format!(
                "[[check]]\nname = \"sneaky\"\ntype = \"sql\"\nsql = \"{}\"\n",
                sql.replace('\\', "\\\\").replace('"', "\\\"")
            ));
            let err = run_set_checks(&checks, &[], &schema, None)
                .await
                .err()
                .unwrap_or_else(|| panic!("{sql} was run"))
                .to_string();
            assert!(
                err.contains("[[check]] `sneaky`") && err.contains("not supported"),
                "{sql}: {err}"
            );
        }
        assert!(!copied.exists());
    }

    #[test]
    fn a_check_naming_a_missing_column_is_refused_by_name() {
        let checks =
            spec_checks("[[check]]\nname = \"c\"\ntype = \"not_null\"\ncolumns = [\"nope\"]\n");
        let err = RowCheckCounter::new(
            &row_checks(&checks, &batch().schema()).unwrap(),
            &batch().schema(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("[[check]] `c`") && err.contains("nope"),
            "{err}"
        );
    }
}
