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

/// Operators whose output partition `p` is not made from partition `p` of each child: below
/// them a task reads other partitions of a shuffle than its own.
const PARTITION_MIXING: &[&str] = &[
    "CoalescePartitionsExec",
    "SortPreservingMergeExec",
    "RepartitionExec",
    "UnionExec",
];

/// The stage plan `plan` as the task of partition `partition` needs it: every shuffle reader
/// that the task reads only its own partition of keeps only that partition's segments (the
/// others are emptied). A stage plan holds the segments of every partition, so without this
/// each of N tasks would carry (and decode) the segments of all N: N² in all. Readers below
/// an operator that mixes partitions, and broadcast readers, are left whole. `None` when
/// pruning would drop fewer than `min_dropped` segments: the stage's shared plan serves, and
/// the coordinator does not encode a plan per task for a saving smaller than that encoding.
pub fn for_partition(
    plan: &Arc<dyn ExecutionPlan>,
    partition: usize,
    min_dropped: usize,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let mut dropped = 0;
    // The root is the stage's shuffle writer (or the table writer's input): its task runs
    // partition `partition` of the writer's input.
    let aligned_root = plan.children().len() == 1
        && matches!(plan.name(), "ShuffleWriterExec" | "SortShuffleWriterExec");
    let result = if aligned_root {
        let input = prune(plan.children()[0].clone(), partition, &mut dropped)?;
        plan.clone().with_new_children(vec![input])?
    } else {
        prune(plan.clone(), partition, &mut dropped)?
    };
    Ok((dropped > 0 && dropped >= min_dropped).then_some(result))
}

/// `node` with its aligned readers pruned to `partition`; `dropped` counts the segments left
/// out.
fn prune(
    node: Arc<dyn ExecutionPlan>,
    partition: usize,
    dropped: &mut usize,
) -> Result<Arc<dyn ExecutionPlan>> {
    if let Some(reader) = node.as_any().downcast_ref::<ObjectStoreShuffleReaderExec>() {
        if reader.broadcast || reader.partitions.len() <= 1 {
            return Ok(node);
        }
        let mut partitions = vec![Vec::new(); reader.partitions.len()];
        if let Some(own) = reader.partitions.get(partition) {
            partitions[partition] = own.clone();
        }
        let all: usize = reader.partitions.iter().map(Vec::len).sum();
        *dropped += all - partitions.iter().map(Vec::len).sum::<usize>();
        return Ok(Arc::new(ObjectStoreShuffleReaderExec::new(
            reader.stage_id,
            reader.schema(),
            reader.properties().output_partitioning().clone(),
            partitions,
            false,
        )));
    }
    if PARTITION_MIXING.contains(&node.name()) || node.children().is_empty() {
        return Ok(node);
    }
    let count = node.properties().output_partitioning().partition_count();
    let mut changed = false;
    let children = node
        .children()
        .into_iter()
        .map(|child| {
            if child.properties().output_partitioning().partition_count() != count {
                return Ok(child.clone());
            }
            let new = prune(child.clone(), partition, dropped)?;
            changed |= !Arc::ptr_eq(&new, child);
            Ok(new)
        })
        .collect::<Result<Vec<_>>>()?;
    if changed {
        Ok(node.with_new_children(children)?)
    } else {
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::col;
    use datafusion::physical_plan::Partitioning;
    use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
    use datafusion::physical_plan::projection::ProjectionExec;
    use datafusion::physical_plan::union::UnionExec;

    /// A reader of three partitions, each with one segment named after it.
    fn reader(broadcast: bool) -> Arc<dyn ExecutionPlan> {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true)]));
        let partitions = (0..3)
            .map(|p| {
                vec![Segment {
                    output_partition: p,
                    path: format!("s{p}"),
                    offset: 0,
                    length: 1,
                    rows: 1,
                }]
            })
            .collect();
        Arc::new(ObjectStoreShuffleReaderExec::new(
            1,
            schema,
            Partitioning::UnknownPartitioning(3),
            partitions,
            broadcast,
        ))
    }

    /// Each reader of `plan`: the segment paths of each of its partitions.
    fn readers(plan: &Arc<dyn ExecutionPlan>) -> Vec<Vec<Vec<String>>> {
        let mut found = Vec::new();
        plan.apply(|node| {
            if let Some(r) = node.as_any().downcast_ref::<ObjectStoreShuffleReaderExec>() {
                found.push(
                    r.partitions
                        .iter()
                        .map(|p| p.iter().map(|s| s.path.clone()).collect())
                        .collect(),
                );
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })
        .unwrap();
        found
    }

    fn project(input: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
        let k = col("k", &input.schema()).unwrap();
        Arc::new(ProjectionExec::try_new(vec![(k, "k".to_string())], input).unwrap())
    }

    #[test]
    fn a_task_carries_only_its_own_partition_of_an_aligned_reader() {
        let plan = project(reader(false));
        let pruned = for_partition(&plan, 1, 1).unwrap().expect("pruned");
        assert_eq!(
            readers(&pruned),
            vec![vec![vec![], vec!["s1".to_string()], vec![]]]
        );
        // The stage's plan itself is untouched.
        assert_eq!(readers(&plan)[0][0], vec!["s0".to_string()]);
        // Dropping two segments is not worth a plan of its own when three are asked for.
        assert!(for_partition(&plan, 1, 3).unwrap().is_none());
    }

    #[test]
    fn readers_below_a_partition_mixing_operator_or_broadcast_stay_whole() {
        let whole = vec![vec!["s0".to_string()], vec!["s1".into()], vec!["s2".into()]];
        let coalesced: Arc<dyn ExecutionPlan> =
            Arc::new(CoalescePartitionsExec::new(reader(false)));
        let union = UnionExec::try_new(vec![reader(false), reader(false)]).unwrap();
        for plan in [coalesced, project(reader(true)), union] {
            assert!(
                for_partition(&plan, 0, 1).unwrap().is_none(),
                "{}",
                plan.name()
            );
            assert!(readers(&plan).iter().all(|r| *r == whole));
        }
    }
}
