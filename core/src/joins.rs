//! Join strategy for plans whose partitions run as separate tasks.
//!
//! DataFusion's join selection picks a broadcast (`CollectLeft`) hash join when one side is
//! small, a partitioned hash join otherwise. Two of its choices are only right inside one
//! process, or only within memory:
//!
//! - A broadcast join whose type emits unmatched **build** rows (left, full, left semi/anti/
//!   mark) does so once, after the last partition of the shared plan has probed. Tasks
//!   run partitions of separate copies of the plan, so every task would emit the build rows
//!   its own probe rows did not match: duplicates, or wrong anti/semi results (Ballista's
//!   issue 1055, the reason Ballista turns broadcasts off). Such joins are shuffled
//!   (partitioned) instead; DataFusion swaps the small side to the build side when the join
//!   type allows, so a `big LEFT JOIN small` is still broadcast (as a right join).
//!   A null-aware anti join (`NOT IN`) must see every probe row in one place: its probe side
//!   is merged into one partition ([`single_probe_for_build_emitting_joins`]).
//! - DataFusion sizes a join side with string columns at 64 bytes a row (the row threshold),
//!   too little for long strings. A broadcast whose build side, counted column by column,
//!   reaches the broadcast threshold is shuffled instead: its table would not fit where the
//!   threshold meant it to.
//! - A partitioned hash join holds its build partition in memory and does not spill. When the
//!   build side's estimated size per task exceeds what a task can hold, the join becomes a
//!   sort-merge join, whose sorts spill.
//!
//! [`DistributedJoins`] runs right after DataFusion's join selection, so distribution and
//! sorting are enforced around the joins it leaves.

use std::sync::Arc;

use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::JoinType;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::error::Result;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::joins::{
    HashJoinExec, NestedLoopJoinExec, PartitionMode, SortMergeJoinExec,
};
use datafusion::physical_plan::projection::ProjectionExec;

use crate::session::NightshiftOptions;

/// Whether a join of this type emits rows of its build (left) side after the last probe
/// batch: only correct when one plan instance sees every probe partition.
pub fn emits_build_rows_at_end(join_type: JoinType) -> bool {
    matches!(
        join_type,
        JoinType::Left
            | JoinType::Full
            | JoinType::LeftSemi
            | JoinType::LeftAnti
            | JoinType::LeftMark
    )
}

/// The physical optimizer rule described in the module documentation.
#[derive(Debug, Default)]
pub struct DistributedJoins;

impl PhysicalOptimizerRule for DistributedJoins {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let options = config
            .extensions
            .get::<NightshiftOptions>()
            .cloned()
            .unwrap_or_default();
        let partitions = config.execution.target_partitions.max(1);
        let threshold = config.optimizer.hash_join_single_partition_threshold;
        plan.transform_up(|node| {
            let Some(join) = node.as_any().downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            if *join.partition_mode() == PartitionMode::CollectLeft
                && !join.null_aware
                && ((!options.single_process && emits_build_rows_at_end(*join.join_type()))
                    || build_in_memory_reaches(join, threshold))
            {
                let partitioned = join
                    .builder()
                    .with_partition_mode(PartitionMode::Partitioned)
                    .build()?;
                return Ok(Transformed::yes(Arc::new(partitioned) as _));
            }
            if *join.partition_mode() == PartitionMode::Partitioned
                && options.task_memory_bytes > 0
                && !join.null_aware
                && build_exceeds(join, partitions, options.task_memory_bytes)
                && let Some(merge) = sort_merge(join)?
            {
                return Ok(Transformed::yes(merge));
            }
            Ok(Transformed::no(node))
        })
        .data()
    }

    fn name(&self) -> &str {
        "nightshift_distributed_joins"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Whether a broadcast join's build side, counted column by column, is not below the
/// broadcast threshold after all. DataFusion has a total size only for sides of fixed-width
/// columns; a side with strings it sizes at 64 bytes a row (our row threshold), low for long
/// strings. This adds the columns' own estimates (a string's Parquet bytes), each at least
/// what Arrow holds per row for its type (a 16-byte view for a string view).
fn build_in_memory_reaches(join: &HashJoinExec, threshold: usize) -> bool {
    in_memory_bytes(join.left().as_ref()).is_some_and(|bytes| bytes >= threshold)
}

/// What `plan`'s rows take in memory by its statistics, counted column by column: each
/// column's own estimate (a string's Parquet bytes), at least what Arrow holds per row for
/// its type. `None` without a row count.
pub(crate) fn in_memory_bytes(plan: &dyn ExecutionPlan) -> Option<usize> {
    let stats = plan.partition_statistics(None).ok()?;
    let rows = *stats.num_rows.get_value()?;
    let schema = plan.schema();
    let mut bytes = 0usize;
    for (field, column) in schema.fields().iter().zip(&stats.column_statistics) {
        let floor = rows.saturating_mul(in_memory_bytes_per_row(field.data_type()));
        let estimate = column.byte_size.get_value().copied().unwrap_or(0);
        bytes = bytes.saturating_add(estimate.max(floor));
    }
    Some(bytes)
}

/// The least bytes per row Arrow holds for a column of this type: its fixed width, a string
/// or binary view, or an offset.
fn in_memory_bytes_per_row(data_type: &DataType) -> usize {
    match data_type {
        DataType::Utf8View | DataType::BinaryView => 16,
        DataType::Utf8 | DataType::Binary => 4,
        DataType::LargeUtf8 | DataType::LargeBinary => 8,
        DataType::Dictionary(key, _) => in_memory_bytes_per_row(key),
        other => other.primitive_width().unwrap_or(0),
    }
}

/// A hash table costs about twice its input, and a task keeps room for the rest of its plan:
/// a build partition may take a quarter of the task's memory.
fn build_exceeds(join: &HashJoinExec, partitions: usize, task_memory: usize) -> bool {
    let Ok(stats) = join.left().partition_statistics(None) else {
        return false;
    };
    match stats.total_byte_size.get_value() {
        Some(bytes) => bytes / partitions > task_memory / 4,
        None => false,
    }
}

/// The same join as a sort-merge join (with the hash join's output projection), if
/// DataFusion supports its type that way.
fn sort_merge(join: &HashJoinExec) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    if matches!(join.join_type(), JoinType::LeftMark | JoinType::RightMark) {
        return Ok(None);
    }
    let merge = SortMergeJoinExec::try_new(
        join.left().clone(),
        join.right().clone(),
        join.on().to_vec(),
        join.filter().cloned(),
        *join.join_type(),
        vec![SortOptions::default(); join.on().len()],
        join.null_equality(),
    )?;
    let merge: Arc<dyn ExecutionPlan> = Arc::new(merge);
    let Some(projection) = &join.projection else {
        return Ok(Some(merge));
    };
    let schema = merge.schema();
    let exprs = projection
        .iter()
        .map(|&i| {
            let name = schema.field(i).name().clone();
            (
                Arc::new(Column::new(&name, i)) as Arc<dyn datafusion::physical_expr::PhysicalExpr>,
                name,
            )
        })
        .collect::<Vec<_>>();
    Ok(Some(Arc::new(ProjectionExec::try_new(exprs, merge)?)))
}

/// After optimization, for plans cut into tasks: a join that must emit build rows at the end
/// but still collects its build side (a null-aware anti join, a nested-loop join) gets its
/// probe side merged into one partition, so one task sees every probe row.
pub fn single_probe_for_build_emitting_joins(
    plan: Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let join_type = if let Some(join) = node.as_any().downcast_ref::<HashJoinExec>() {
            (*join.partition_mode() == PartitionMode::CollectLeft).then_some(*join.join_type())
        } else {
            node.as_any()
                .downcast_ref::<NestedLoopJoinExec>()
                .map(|join| *join.join_type())
        };
        let Some(join_type) = join_type else {
            return Ok(Transformed::no(node));
        };
        let probe = node.children()[1].clone();
        if !emits_build_rows_at_end(join_type)
            || probe.properties().output_partitioning().partition_count() <= 1
        {
            return Ok(Transformed::no(node));
        }
        let build = node.children()[0].clone();
        let merged: Arc<dyn ExecutionPlan> = Arc::new(CoalescePartitionsExec::new(probe));
        Ok(Transformed::yes(
            node.with_new_children(vec![build, merged])?,
        ))
    })
    .data()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int32Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_plan::displayable;
    use datafusion::prelude::ParquetReadOptions;

    use crate::session::{SessionOptions, new_session, with_broadcast_threshold};

    fn write(path: &std::path::Path, batch: RecordBatch) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        crate::iceberg_scan::tests::write_parquet(path, batch);
    }

    /// `dim` has 100,000 rows of a key, a 200-byte string and a column the query does not
    /// read: 20 MB. DataFusion sizes a side with strings at 64 bytes a row (6.4 MB) and would
    /// broadcast it under an 8 MiB threshold; it is shuffled with `fact` (16 MB) instead.
    #[tokio::test]
    async fn a_build_side_of_long_strings_is_sized_by_its_columns() {
        let dir = tempfile::tempdir().unwrap();
        let rows = 100_000;
        // Two files a table, one a task.
        let keys = |from: i32, to: i32| Arc::new(Int32Array::from_iter_values(from..to));
        for (part, (from, to)) in [(0, rows / 2), (rows / 2, rows)].into_iter().enumerate() {
            let dim = RecordBatch::try_new(
                Arc::new(Schema::new(vec![
                    Field::new("k", DataType::Int32, false),
                    Field::new("comment", DataType::Utf8, false),
                    Field::new("unread", DataType::Int32, false),
                ])),
                vec![
                    keys(from, to),
                    Arc::new(StringArray::from_iter_values(
                        (from..to).map(|i| format!("{i:0>200}")),
                    )),
                    keys(from, to),
                ],
            )
            .unwrap();
            write(&dir.path().join(format!("dim/{part}.parquet")), dim);
            let fact = RecordBatch::try_new(
                Arc::new(Schema::new(vec![Field::new("k", DataType::Int32, false)])),
                vec![keys(40 * from, 40 * to)],
            )
            .unwrap();
            write(&dir.path().join(format!("fact/{part}.parquet")), fact);
        }

        let plan_under = |threshold: u64| {
            let dir = dir.path().to_path_buf();
            async move {
                let ctx = new_session(SessionOptions {
                    partitions: 2,
                    ..Default::default()
                });
                {
                    let state = ctx.state_ref();
                    let mut state = state.write();
                    let config = state.config_mut();
                    *config = with_broadcast_threshold(config.clone(), threshold);
                }
                for table in ["dim", "fact"] {
                    let path = format!("{}/", dir.join(table).display());
                    ctx.register_parquet(table, &path, ParquetReadOptions::default())
                        .await
                        .unwrap();
                }
                let df = ctx
                    .sql("SELECT dim.comment, fact.k FROM fact JOIN dim ON fact.k = dim.k")
                    .await
                    .unwrap();
                let plan = df.create_physical_plan().await.unwrap();
                displayable(plan.as_ref()).indent(true).to_string()
            }
        };
        // The same join broadcasts under a threshold its Arrow size is below.
        let roomy = plan_under(64 << 20).await;
        assert!(roomy.contains("mode=CollectLeft"), "{roomy}");
        let tight = plan_under(8 << 20).await;
        assert!(!tight.contains("mode=CollectLeft"), "{tight}");
        assert!(tight.contains("mode=Partitioned"), "{tight}");
    }
}
