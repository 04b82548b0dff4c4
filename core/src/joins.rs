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
//! - A partitioned hash join holds its build partition in memory and does not spill. When the
//!   build side's estimated size per task exceeds what a task can hold, the join becomes a
//!   sort-merge join, whose sorts spill.
//!
//! [`DistributedJoins`] runs right after DataFusion's join selection, so distribution and
//! sorting are enforced around the joins it leaves.

use std::sync::Arc;

use datafusion::arrow::compute::SortOptions;
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
        plan.transform_up(|node| {
            let Some(join) = node.as_any().downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            if !options.single_process
                && *join.partition_mode() == PartitionMode::CollectLeft
                && emits_build_rows_at_end(*join.join_type())
                && !join.null_aware
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
