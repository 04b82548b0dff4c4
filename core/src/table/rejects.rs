//! Quarantine (`on_fail = "quarantine"`): the rows a quarantining check fails go to the
//! `<table>__rejects` table instead of the target, with the check's name, the rule they broke
//! and the job that set them aside.
//!
//! The coordinator creates or evolves the rejects table ([`ensure_rejects_table`]) and hands
//! the writing tasks its location and schema ([`v1::RejectsOutput`]); each task splits its
//! batches ([`Quarantine::set_aside`]): the failing rows are written as data files of the
//! rejects table (named like the task's other files, so the job's cleanup finds them), the
//! others go on to the target's writer. The coordinator commits both tables' files, the rejects
//! first (see `ARCHITECTURE.md`, "Quarantine").

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{DataType, Field, Schema as ArrowSchema, SchemaRef};
use iceberg::spec::PartitionSpec;
use iceberg::table::Table;
use iceberg::{Catalog, TableIdent};
use nightshift_proto::v1;
use nightshift_spec::{
    REJECT_CHECK_COLUMN, REJECT_JOB_COLUMN, REJECT_REASON_COLUMN, SchemaEvolution,
};

use super::evolution::SchemaChange;
use super::layout::{TargetLayout, ensure_target};
use super::partition_values::PartitionSplitter;
use super::writer::{PartitionedWriter, TableTarget, conform_batch, new_writer, serialized};
use crate::checks::{Counted, arrow_error, compile_row_checks};
use crate::error::{CoreError, Result};

/// The rejects table's columns: the result's, every one optional (a rejected row may lack
/// what the target requires), then the check, the reason and the job id. A result column
/// with one of those three names is refused.
pub fn rejects_schema(result: &ArrowSchema, table: &str) -> Result<ArrowSchema> {
    let added = [REJECT_CHECK_COLUMN, REJECT_REASON_COLUMN, REJECT_JOB_COLUMN];
    if let Some(clash) = result
        .fields()
        .iter()
        .find(|f| added.contains(&f.name().as_str()))
    {
        return Err(CoreError::Target {
            table: table.to_string(),
            message: format!(
                "the result has a column `{}`, which the rejects table keeps for itself (rename it)",
                clash.name()
            ),
        });
    }
    let fields = result
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .chain(added.map(|name| Field::new(name, DataType::Utf8, true)));
    Ok(ArrowSchema::new(fields.collect::<Vec<_>>()))
}

/// The rejects table as this job needs it: created (unpartitioned) if missing, with the
/// result's new columns added when it exists (in the commit of its rejected rows, as for any
/// target with `schema_evolution = "add_columns"`), and what the tasks need to write into it.
pub async fn ensure_rejects_table(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    result: &ArrowSchema,
    job_id: &str,
) -> Result<(Table, Option<SchemaChange>, v1::RejectsOutput)> {
    let wanted = rejects_schema(result, &ident.to_string())?;
    let layout = TargetLayout {
        result_schema: &wanted,
        partition_by: &[],
        evolution: SchemaEvolution::AddColumns,
    };
    let (table, change) = ensure_target(catalog, ident, &layout, &HashMap::new()).await?;
    let metadata = table.metadata();
    if !metadata.default_partition_spec().is_unpartitioned() {
        return Err(CoreError::Target {
            table: ident.to_string(),
            message: "a rejects table is unpartitioned; this one has a partition spec (drop it or \
                      give the pipeline's target another name)"
                .to_string(),
        });
    }
    let schema = change
        .as_ref()
        .map_or(metadata.current_schema().as_ref(), |c| &c.schema);
    let output = v1::RejectsOutput {
        data_location: format!("{}/data", metadata.location()),
        schema_json: serde_json::to_string(schema)
            .map_err(|e| CoreError::Protocol(format!("cannot serialize a schema: {e}")))?,
        format_version: metadata.format_version() as u32,
        job_id: job_id.to_string(),
    };
    Ok((table, change, output))
}

/// A writing task's quarantine: the quarantining checks, compiled, and the writer of the
/// rejects table's data files.
pub struct Quarantine {
    checks: Vec<Quarantining>,
    schema: SchemaRef,
    job_id: String,
    writer: PartitionedWriter,
    target: TableTarget,
    rows: u64,
    /// The target's partitions of the rows set aside, when the target is partitioned: an
    /// `overwrite_partitions` commit replaces them too (else a partition whose new rows all
    /// went aside kept its old rows beside the other partitions' new ones).
    set_aside_partitions: Option<(PartitionSplitter, BTreeSet<String>)>,
}

struct Quarantining {
    counted: Counted,
    reason: String,
}

/// What a task's quarantine wrote.
pub struct RejectsWritten {
    pub data_files_json: Vec<String>,
    pub rows: u64,
    /// Rows set aside by each quarantining check (a row counts for the first it fails).
    pub checks: Vec<v1::CheckOutcome>,
    /// The target's partitions of the rows set aside (JSON of the partition struct), none
    /// for an unpartitioned target.
    pub partitions_json: Vec<String>,
}

impl Quarantine {
    /// The quarantine of a task writing rows of `rows_schema` with `checks`, or `None` when
    /// no check quarantines. Its files are named `<file_prefix>-<n>.parquet`. With
    /// `target_partitions` (the target's partitioning) it records the partitions of the rows
    /// it sets aside.
    pub(crate) fn new(
        checks: &[v1::RowCheck],
        rows_schema: &SchemaRef,
        out: Option<&v1::RejectsOutput>,
        file_prefix: &str,
        target_partitions: Option<PartitionSplitter>,
    ) -> Result<Option<Self>> {
        let quarantining: Vec<v1::RowCheck> =
            checks.iter().filter(|c| c.quarantine).cloned().collect();
        if quarantining.is_empty() {
            return Ok(None);
        }
        let Some(out) = out else {
            return Err(CoreError::Protocol(
                "a check quarantines rows but the task names no rejects table".to_string(),
            ));
        };
        let compiled = compile_row_checks(&quarantining, rows_schema)?
            .into_iter()
            .map(|(check, predicate)| Quarantining {
                counted: Counted::new(&check.name, predicate),
                reason: format!("fails {}", check.predicate_sql),
            })
            .collect();
        let as_table = v1::TableOutput {
            data_location: out.data_location.clone(),
            schema_json: out.schema_json.clone(),
            partition_spec_json: serde_json::to_string(&PartitionSpec::unpartition_spec())
                .map_err(|e| CoreError::Protocol(e.to_string()))?,
            format_version: out.format_version,
            target_file_size_bytes: 512 << 20,
            ..Default::default()
        };
        let target = TableTarget::from_task(&as_table)?;
        let writer = new_writer(
            &target,
            &as_table,
            file_prefix.to_string(),
            super::writer::WriteLayout::unbounded(),
        )?;
        Ok(Some(Quarantine {
            checks: compiled,
            schema: target.arrow_schema.clone(),
            job_id: out.job_id.clone(),
            writer,
            target,
            rows: 0,
            set_aside_partitions: target_partitions.map(|splitter| (splitter, BTreeSet::new())),
        }))
    }

    /// Writes the rows of `batch` that fail a quarantining check to the rejects table and
    /// returns the others.
    pub async fn set_aside(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let mut first_failed: Vec<Option<usize>> = vec![None; batch.num_rows()];
        for (index, check) in self.checks.iter_mut().enumerate() {
            let failing = check.counted.failing(&batch)?;
            let mut mine = Vec::new();
            for (row, first) in first_failed.iter_mut().enumerate() {
                if first.is_none() && failing.value(row) {
                    *first = Some(index);
                    mine.push(row as u32);
                }
            }
            check.counted.record(&batch, &mine)?;
        }
        if first_failed.iter().all(Option::is_none) {
            return Ok(batch);
        }
        let rejected: BooleanArray = first_failed.iter().map(|f| Some(f.is_some())).collect();
        let kept = arrow::compute::not(&rejected).map_err(arrow_error)?;
        self.write_rejected(&batch, &rejected, &first_failed)
            .await?;
        filter_record_batch(&batch, &kept).map_err(arrow_error)
    }

    async fn write_rejected(
        &mut self,
        batch: &RecordBatch,
        rejected: &BooleanArray,
        first_failed: &[Option<usize>],
    ) -> Result<()> {
        let rows = filter_record_batch(batch, rejected).map_err(arrow_error)?;
        if let Some((splitter, partitions)) = &mut self.set_aside_partitions {
            for key in splitter.partition_of_each_row(&rows)? {
                partitions.insert(splitter.partition_json(&key)?);
            }
        }
        let failed_checks: Vec<&Quarantining> = first_failed
            .iter()
            .flatten()
            .map(|&index| &self.checks[index])
            .collect();
        let text = |of: &dyn Fn(&Quarantining) -> &str| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(
                failed_checks.iter().map(|c| of(c)),
            ))
        };
        let mut fields: Vec<Arc<Field>> = rows.schema().fields().iter().cloned().collect();
        let mut columns = rows.columns().to_vec();
        for (name, column) in [
            (REJECT_CHECK_COLUMN, text(&|c| &c.counted.name)),
            (REJECT_REASON_COLUMN, text(&|c| &c.reason)),
            (
                REJECT_JOB_COLUMN,
                Arc::new(StringArray::from(vec![
                    self.job_id.as_str();
                    rows.num_rows()
                ])),
            ),
        ] {
            fields.push(Arc::new(Field::new(name, DataType::Utf8, true)));
            columns.push(column);
        }
        let with_reasons = RecordBatch::try_new(
            Arc::new(ArrowSchema::new(
                fields
                    .into_iter()
                    .map(|f| f.as_ref().clone().with_nullable(true))
                    .collect::<Vec<_>>(),
            )),
            columns,
        )
        .map_err(arrow_error)?;
        let conformed = conform_batch(&with_reasons, &self.schema)?;
        self.rows += conformed.num_rows() as u64;
        self.writer.write(conformed).await?;
        Ok(())
    }

    /// Closes the rejects writer: its data files and each check's count and samples.
    pub async fn finish(self) -> Result<RejectsWritten> {
        let files = self.writer.close().await?;
        Ok(RejectsWritten {
            data_files_json: serialized(&self.target, files)?,
            rows: self.rows,
            checks: self
                .checks
                .into_iter()
                .map(|c| c.counted.outcome())
                .collect(),
            partitions_json: self
                .set_aside_partitions
                .map(|(_, partitions)| partitions.into_iter().collect())
                .unwrap_or_default(),
        })
    }
}

/// Why a job must not go on to its commits when the rejects table already holds rows it set
/// aside (`earlier`: that snapshot and its row count) and this attempt sets `now` rows
/// aside: the rejects of a job id are committed once, so this attempt's would be dropped
/// while reported set aside (an attempt whose every row was quarantined commits only the
/// rejects; its rerun on corrected input lost the rows still rejected). The same count is
/// taken for the same rows: a rerun after a crash between the two commits goes on. `None`:
/// it may go on.
pub fn earlier_rejects_differ(
    job: &str,
    rejects_table: &str,
    earlier: Option<(i64, u64)>,
    now: u64,
) -> Option<String> {
    let (snapshot, rows) = earlier?;
    (rows != now).then(|| {
        format!(
            "an earlier run of job `{job}` set {rows} rows aside in `{rejects_table}` (snapshot {snapshot}), and this run sets {now} aside: its input or code changed since. A job id's rejects are committed once, so this run's would be lost; run it under a new job id (run --job-id; for a backfill, a new --run-id)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rerun_whose_rejects_differ_from_the_committed_ones_stops() {
        assert_eq!(earlier_rejects_differ("j", "ns.t__rejects", None, 3), None);
        assert_eq!(
            earlier_rejects_differ("j", "ns.t__rejects", Some((7, 3)), 3),
            None
        );
        let why = earlier_rejects_differ("j", "ns.t__rejects", Some((7, 2)), 1).unwrap();
        assert!(
            why.contains("set 2 rows aside in `ns.t__rejects` (snapshot 7), and this run sets 1"),
            "{why}"
        );
        assert!(earlier_rejects_differ("j", "r", Some((7, 2)), 0).is_some());
    }

    #[tokio::test]
    async fn a_row_goes_aside_once_for_the_first_check_it_fails() {
        use datafusion::arrow::array::Int64Array;
        let dir = tempfile::tempdir().unwrap();
        let rows = Arc::new(ArrowSchema::new(vec![Field::new(
            "n",
            DataType::Int64,
            true,
        )]));
        let wanted = rejects_schema(&rows, "a.t__rejects").unwrap();
        let schema = crate::table::iceberg_schema_for("a.t__rejects", &wanted).unwrap();
        let out = v1::RejectsOutput {
            data_location: dir.path().display().to_string(),
            schema_json: serde_json::to_string(&schema).unwrap(),
            format_version: 2,
            job_id: "j".into(),
        };
        let check = |name: &str, predicate: &str, quarantine| v1::RowCheck {
            name: name.into(),
            predicate_sql: predicate.into(),
            quarantine,
        };
        let checks = [
            check("positive", "n > 0", true),
            check("small", "n < 10", true),
            check("counted", "n <> 5", false),
        ];
        let mut quarantine = Quarantine::new(&checks, &rows, Some(&out), "j-s1-p0-a1-x", None)
            .unwrap()
            .unwrap();
        let batch = RecordBatch::try_new(
            rows.clone(),
            vec![Arc::new(Int64Array::from(vec![
                Some(-1),
                Some(5),
                Some(20),
                None,
                Some(-30),
            ]))],
        )
        .unwrap();
        let kept = quarantine.set_aside(batch).await.unwrap();
        // NULL passes; -1 and -30 fail both and go aside once, for `positive`.
        let kept: Vec<Option<i64>> = kept
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(kept, [Some(5), None]);
        let written = quarantine.finish().await.unwrap();
        assert_eq!(written.rows, 3);
        assert_eq!(written.data_files_json.len(), 1);
        let counts: Vec<(&str, u64)> = written
            .checks
            .iter()
            .map(|c| (c.name.as_str(), c.failed))
            .collect();
        assert_eq!(counts, [("positive", 2), ("small", 1)]);
    }

    #[test]
    fn the_rejects_schema_adds_the_reasons_and_makes_every_column_optional() {
        let result = ArrowSchema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("größe", DataType::Float64, true),
        ]);
        let schema = rejects_schema(&result, "a.t__rejects").unwrap();
        let described: Vec<(String, bool)> = schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.is_nullable()))
            .collect();
        assert_eq!(
            described,
            [
                ("id".to_string(), true),
                ("größe".to_string(), true),
                ("__check".to_string(), true),
                ("__reason".to_string(), true),
                ("__job_id".to_string(), true),
            ]
        );
        let clash = ArrowSchema::new(vec![Field::new("__reason", DataType::Utf8, true)]);
        let err = rejects_schema(&clash, "a.t__rejects")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`__reason`") && err.contains("rename"),
            "{err}"
        );
    }
}
