//! Connects a stage to the outputs of the stages it reads.

use std::collections::HashMap;
use std::sync::Arc;

use ballista_core::execution_plans::UnresolvedShuffleExec;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::physical_plan::ExecutionPlan;

use super::{ObjectStoreShuffleReaderExec, Segment};
use crate::error::Result;

/// The winning segments of a finished stage, by output partition.
#[derive(Debug, Clone, Default)]
pub struct StageOutput {
    pub by_partition: Vec<Vec<Segment>>,
}

impl StageOutput {
    /// Collects the segments of every map task into output partitions `0..partition_count`.
    pub fn from_segments(
        partition_count: usize,
        segments: impl IntoIterator<Item = Segment>,
    ) -> Self {
        let mut by_partition = vec![Vec::new(); partition_count];
        for segment in segments {
            let index = segment.output_partition as usize;
            if index >= by_partition.len() {
                by_partition.resize(index + 1, Vec::new());
            }
            by_partition[index].push(segment);
        }
        StageOutput { by_partition }
    }
}

/// Stage ids that `plan` reads through unresolved shuffles.
pub fn upstream_stages(plan: &Arc<dyn ExecutionPlan>) -> Result<Vec<u32>> {
    let unresolved = ballista_scheduler::planner::find_unresolved_shuffles(plan)?;
    let mut ids: Vec<u32> = unresolved.iter().map(|u| u.stage_id as u32).collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Replaces each `UnresolvedShuffleExec` in `plan` with a reader of the finished stage.
pub fn resolve_shuffles(
    plan: Arc<dyn ExecutionPlan>,
    outputs: &HashMap<u32, StageOutput>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let resolved = plan.transform_up(|node| {
        let Some(unresolved) = node.as_any().downcast_ref::<UnresolvedShuffleExec>() else {
            return Ok(Transformed::no(node));
        };
        let stage_id = unresolved.stage_id as u32;
        let output = outputs.get(&stage_id).ok_or_else(|| {
            datafusion::error::DataFusionError::Internal(format!(
                "stage {stage_id} has no recorded output"
            ))
        })?;
        if unresolved.coalesce.is_some() {
            return Err(datafusion::error::DataFusionError::NotImplemented(
                "coalesced shuffle reads are not supported".into(),
            ));
        }
        let (partitions, partitioning) = if unresolved.broadcast {
            let all = output
                .by_partition
                .iter()
                .flatten()
                .cloned()
                .collect::<Vec<_>>();
            (
                vec![all],
                unresolved.properties().output_partitioning().clone(),
            )
        } else {
            let count = unresolved.output_partition_count;
            let mut partitions = output.by_partition.clone();
            partitions.resize(count.max(partitions.len()), Vec::new());
            partitions.truncate(count);
            (
                partitions,
                unresolved.properties().output_partitioning().clone(),
            )
        };
        let reader = ObjectStoreShuffleReaderExec::new(
            stage_id,
            unresolved.schema(),
            partitioning,
            partitions,
            unresolved.broadcast,
        );
        Ok(Transformed::yes(Arc::new(reader) as Arc<dyn ExecutionPlan>))
    })?;
    Ok(resolved.data)
}
