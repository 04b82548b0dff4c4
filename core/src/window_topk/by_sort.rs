//! The first K rows of each key by DataFusion's sort, which spills: what an exact
//! [`super::PartitionTopKExec`] falls back to when its memory pool will not hold one entry per
//! key (a dedupe over nearly unique keys larger than a task's memory).
//!
//! The rows are sorted by key, then by the window's order, and a run of equal keys passes on
//! its first K rows: the work the plan did before the top K was put in (a sort under the
//! window), with the sort's spill files on the task's spill directory.

use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{RecordBatch, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{OwnedRow, RowConverter};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{LexOrdering, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use futures::TryStreamExt;

/// The first `k` rows of each `partition_by` key of `rows` in `order_by` order, sorted by
/// key: `rows` go through a [`SortExec`] in `context`'s memory pool (spilling past it).
pub(super) fn first_k_by_sort(
    rows: SendableRecordBatchStream,
    partition_by: &[Arc<dyn PhysicalExpr>],
    order_by: &[PhysicalSortExpr],
    k: usize,
    context: Arc<TaskContext>,
) -> Result<SendableRecordBatchStream> {
    let schema = rows.schema();
    let ordering = partition_by
        .iter()
        .map(|key| PhysicalSortExpr {
            expr: key.clone(),
            options: Default::default(),
        })
        .chain(order_by.iter().cloned());
    let ordering = LexOrdering::new(ordering)
        .ok_or_else(|| DataFusionError::Internal("a top K with no sort keys".into()))?;
    let source = StreamingTableExec::try_new(
        schema.clone(),
        vec![Arc::new(TakenOnce::new(rows))],
        None,
        [],
        false,
        None,
    )?;
    let sorted = SortExec::new(ordering, Arc::new(source)).execute(0, context)?;
    let mut runs = KeyRuns::new(&schema, partition_by.to_vec(), k)?;
    let first = sorted.and_then(move |batch| futures::future::ready(runs.first_k(&batch)));
    Ok(Box::pin(RecordBatchStreamAdapter::new(schema, first)))
}

/// A stream handed to one [`StreamingTableExec`] partition, which executes it once.
struct TakenOnce {
    schema: SchemaRef,
    stream: Mutex<Option<SendableRecordBatchStream>>,
}

impl std::fmt::Debug for TakenOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TakenOnce").finish_non_exhaustive()
    }
}

impl TakenOnce {
    fn new(stream: SendableRecordBatchStream) -> Self {
        TakenOnce {
            schema: stream.schema(),
            stream: Mutex::new(Some(stream)),
        }
    }
}

impl PartitionStream for TakenOnce {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let taken = self.stream.lock().map(|mut s| s.take()).ok().flatten();
        match taken {
            Some(stream) => stream,
            None => {
                let failed = futures::stream::once(async {
                    Err(DataFusionError::Internal(
                        "a top K's fallback sort read its input twice".into(),
                    ))
                });
                Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), failed))
            }
        }
    }
}

/// Runs of equal keys over batches sorted by key, and how far into the current run.
struct KeyRuns {
    partition_by: Vec<Arc<dyn PhysicalExpr>>,
    keys: RowConverter,
    k: usize,
    current: Option<OwnedRow>,
    taken_of_current: usize,
}

impl KeyRuns {
    fn new(schema: &SchemaRef, partition_by: Vec<Arc<dyn PhysicalExpr>>, k: usize) -> Result<Self> {
        let keys = super::key_converter(schema, &partition_by)?;
        Ok(KeyRuns {
            partition_by,
            keys,
            k: k.max(1),
            current: None,
            taken_of_current: 0,
        })
    }

    /// The rows of `batch` among the first `k` of their key's run (which may have begun in
    /// an earlier batch).
    fn first_k(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let keys = super::rows_of(&self.keys, self.partition_by.iter().cloned(), batch)?;
        let mut taken = Vec::new();
        for (row, key) in keys.iter().enumerate() {
            if self.current.as_ref().is_some_and(|c| c.row() == key) {
                self.taken_of_current += 1;
            } else {
                self.current = Some(key.owned());
                self.taken_of_current = 1;
            }
            if self.taken_of_current <= self.k {
                taken.push(row as u32);
            }
        }
        Ok(take_record_batch(batch, &UInt32Array::from(taken))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::Column;

    fn batch(keys: &[Option<&str>], ids: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, true),
            Field::new("id", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(ids.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_run_of_one_key_keeps_its_first_k_rows_across_batches() {
        let first = batch(&[None, None, Some("é"), Some("é")], &[1, 2, 3, 4]);
        let second = batch(&[Some("é"), Some("é"), Some("日本"), None], &[5, 6, 7, 8]);
        let mut runs = KeyRuns::new(
            &first.schema(),
            vec![Arc::new(Column::new("k", 0)) as Arc<dyn PhysicalExpr>],
            3,
        )
        .unwrap();
        let ids = |b: RecordBatch| -> Vec<i64> {
            let ids = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            ids.values().to_vec()
        };
        assert_eq!(ids(runs.first_k(&first).unwrap()), [1, 2, 3, 4]);
        // "é" had two rows in the first batch: one more, then a new key, then null again
        // (a new run: the input was not sorted, so this only shows runs are what counts).
        assert_eq!(ids(runs.first_k(&second).unwrap()), [5, 7, 8]);
    }
}
