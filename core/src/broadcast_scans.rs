//! Broadcast build sides that are scans of small inputs, read by the stage that probes them.
//!
//! Ballista writes the build side of every broadcast join as a stage of its own, which each
//! probe task then reads whole from its shuffle objects. When that build side is only a scan
//! (files, a projection, filters, the source's not-null check) of a small input, the stage
//! buys nothing: a round of tasks, every row written to storage and read back, and a stage
//! boundary where the workers wait, to give the probe stage what its workers can read from
//! the source themselves, once per worker and stage (`shared_builds`). So the probe stage
//! reads the scan in place and the build stage goes (a dimension table of a star join: three
//! stages of daily revenue's five).
//!
//! - Only a scan whose input, as it is read (its columns, before its filters), is estimated
//!   below the broadcast threshold: a large table filtered down to a small build side stays
//!   a stage, read once rather than once per worker.
//! - Only a stage that broadcasts alone read; one with volatile expressions stays a stage
//!   (each worker would build a table of its own draw).
//! - The stages left are numbered again from 1, in the same order.

use std::collections::HashMap;
use std::sync::Arc;

use ballista_core::execution_plans::{
    ShuffleWriter, ShuffleWriterExec, SortShuffleWriterExec, UnresolvedShuffleExec,
};
use ballista_scheduler::planner::find_unresolved_shuffles;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::physical_expr_common::physical_expr::is_volatile;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;

use crate::iceberg_scan::IcebergScanExec;
use crate::joins::in_memory_bytes;
use crate::not_null::NotNullCheckExec;

/// `writers` (Ballista's stages, in dependency order, the last one final) with each small
/// scanned broadcast read in place by the stages that probe it, and its stage removed.
/// `threshold` is the broadcast threshold in bytes.
pub fn read_small_broadcasts_in_place(
    writers: Vec<Arc<dyn ShuffleWriter>>,
    threshold: usize,
) -> Result<Vec<Arc<dyn ShuffleWriter>>> {
    let inlined = scans_to_read_in_place(&writers, threshold)?;
    if inlined.is_empty() {
        return Ok(writers);
    }
    let kept: Vec<_> = writers
        .into_iter()
        .filter(|w| !inlined.contains_key(&w.stage_id()))
        .collect();
    let new_ids: HashMap<usize, usize> = kept
        .iter()
        .enumerate()
        .map(|(i, w)| (w.stage_id(), i + 1))
        .collect();
    let new_id = |old: usize| {
        new_ids.get(&old).copied().ok_or_else(|| {
            DataFusionError::Internal(format!("stage {old} is read but was not planned"))
        })
    };
    kept.into_iter()
        .map(|writer| {
            let as_plan: Arc<dyn ExecutionPlan> = writer.clone();
            let child = as_plan.children()[0].clone().transform_up(|node| {
                let Some(unresolved) = node.as_any().downcast_ref::<UnresolvedShuffleExec>() else {
                    return Ok(Transformed::no(node));
                };
                if let Some(scan) = inlined.get(&unresolved.stage_id) {
                    return Ok(Transformed::yes(single_partition(scan.clone())));
                }
                let mut moved = unresolved.clone();
                moved.stage_id = new_id(unresolved.stage_id)?;
                Ok(Transformed::yes(Arc::new(moved) as Arc<dyn ExecutionPlan>))
            })?;
            rebuild_writer(&writer, new_id(writer.stage_id())?, child.data)
        })
        .collect()
}

/// The stages (by id) whose plan is a small scan read only by broadcasts, with that plan.
fn scans_to_read_in_place(
    writers: &[Arc<dyn ShuffleWriter>],
    threshold: usize,
) -> Result<HashMap<usize, Arc<dyn ExecutionPlan>>> {
    let mut broadcast_only: HashMap<usize, bool> = HashMap::new();
    for writer in writers {
        let as_plan: Arc<dyn ExecutionPlan> = writer.clone();
        let readers = find_unresolved_shuffles(&as_plan)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        for unresolved in readers {
            let only = broadcast_only.entry(unresolved.stage_id).or_insert(true);
            *only &= unresolved.broadcast;
        }
    }
    let last = writers.len().saturating_sub(1);
    let mut inlined = HashMap::new();
    for writer in &writers[..last] {
        let scan = {
            let as_plan: Arc<dyn ExecutionPlan> = writer.clone();
            as_plan.children()[0].clone()
        };
        if broadcast_only.get(&writer.stage_id()) == Some(&true)
            && writer.shuffle_output_partitioning().is_none()
            && scan_input_below(&scan, threshold)
        {
            inlined.insert(writer.stage_id(), scan);
        }
    }
    Ok(inlined)
}

/// Whether `plan` is a deterministic scan (a source read, projections, filters, the
/// not-null check) whose input, as read, is estimated below `threshold` bytes.
fn scan_input_below(plan: &Arc<dyn ExecutionPlan>, threshold: usize) -> bool {
    let mut node = plan.clone();
    loop {
        let any = node.as_any();
        if let Some(projection) = any.downcast_ref::<ProjectionExec>() {
            if projection.expr().iter().any(|e| is_volatile(&e.expr)) {
                return false;
            }
        } else if let Some(filter) = any.downcast_ref::<FilterExec>() {
            if is_volatile(filter.predicate()) {
                return false;
            }
        } else if any.is::<DataSourceExec>() || any.is::<IcebergScanExec>() {
            return in_memory_bytes(node.as_ref()).is_some_and(|bytes| bytes < threshold);
        } else if !any.is::<NotNullCheckExec>() {
            return false;
        }
        let [child] = node.children()[..] else {
            return false;
        };
        node = child.clone();
    }
}

/// `plan` as one partition, as a broadcast join's build side is read.
fn single_partition(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    if plan.properties().output_partitioning().partition_count() == 1 {
        plan
    } else {
        Arc::new(CoalescePartitionsExec::new(plan))
    }
}

/// `writer` as stage `id` over `child`, of the same kind and output partitioning.
pub(crate) fn rebuild_writer(
    writer: &Arc<dyn ShuffleWriter>,
    id: usize,
    child: Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ShuffleWriter>> {
    let job = writer.job_id().to_string();
    let as_plan: Arc<dyn ExecutionPlan> = writer.clone();
    Ok(
        match as_plan.as_any().downcast_ref::<SortShuffleWriterExec>() {
            Some(sort) => Arc::new(SortShuffleWriterExec::try_new(
                job,
                id,
                child,
                String::new(),
                sort.shuffle_output_partitioning().clone(),
                sort.config().clone(),
            )?),
            None => Arc::new(ShuffleWriterExec::try_new(
                job,
                id,
                child,
                String::new(),
                writer.shuffle_output_partitioning().cloned(),
            )?),
        },
    )
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::common::config::ConfigOptions;
    use datafusion::datasource::MemTable;
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{binary, col, lit};
    use datafusion::physical_expr::{PhysicalExpr, ScalarFunctionExpr};

    use crate::ids::{JobId, StageId};
    use crate::planner::{JobPlan, PlanMode, PlanOptions, plan_job};
    use crate::session::{SessionOptions, new_session};

    use super::*;

    /// Plans `query` for workers whose tasks have `task_memory` (1 GiB: a 128 MiB broadcast
    /// threshold; 128 MiB: 32 MiB), over `dim` (keys 0..`dim_rows`) and `fact` (two
    /// partitions of `fact_rows` / 2 keys), each key with a value `v` = key % 7.
    async fn plan(query: &str, dim_rows: i64, fact_rows: i64, task_memory: u64) -> JobPlan {
        let mode = PlanMode::Distributed {
            task_memory: Some(task_memory),
        };
        let ctx = new_session(SessionOptions {
            partitions: 2,
            task_memory: mode.broadcast_memory(),
            ..Default::default()
        });
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let rows = |range: std::ops::Range<i64>| {
            let keys = Int64Array::from_iter_values(range);
            let values = Int64Array::from_iter(keys.iter().map(|k| k.map(|k| k % 7)));
            RecordBatch::try_new(schema.clone(), vec![Arc::new(keys), Arc::new(values)]).unwrap()
        };
        let dim = MemTable::try_new(schema.clone(), vec![vec![rows(0..dim_rows)]]).unwrap();
        let fact = MemTable::try_new(
            schema.clone(),
            vec![
                vec![rows(0..fact_rows / 2)],
                vec![rows(fact_rows / 2..fact_rows)],
            ],
        )
        .unwrap();
        ctx.register_table("dim", Arc::new(dim)).unwrap();
        ctx.register_table("fact", Arc::new(fact)).unwrap();
        let options = PlanOptions {
            mode,
            partition_by: Vec::new(),
        };
        plan_job(&ctx, &JobId::parse("j").unwrap(), query, &options)
            .await
            .unwrap()
    }

    fn ids(plan: &JobPlan) -> Vec<(StageId, Vec<StageId>)> {
        plan.stages
            .iter()
            .map(|s| (s.id, s.upstream.clone()))
            .collect()
    }

    const BY_DIMENSION: &str =
        "SELECT dim.v, count(*) AS n FROM fact JOIN dim ON fact.k = dim.k GROUP BY dim.v";

    #[tokio::test]
    async fn a_small_broadcast_scan_is_read_by_the_stage_that_probes_it() {
        let plan = plan(BY_DIMENSION, 1_000, 200_000, 1 << 30).await;
        let described = plan.describe();
        assert!(described.contains("mode=CollectLeft"), "{described}");
        assert!(!described.contains("broadcast=true"), "{described}");
        // The join and partial aggregate, then the final aggregate reading it: numbered
        // from 1 with no gap where the dimension's stage was.
        assert_eq!(
            ids(&plan),
            vec![(StageId(1), vec![]), (StageId(2), vec![StageId(1)])],
            "{described}"
        );
        assert!(plan.stages[1].is_final);
    }

    /// A memory scan of keys 0..`rows` and their values (16 bytes a row).
    fn scan(rows: i64) -> Arc<dyn ExecutionPlan> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let keys = Int64Array::from_iter_values(0..rows);
        let values = Int64Array::from_iter_values((0..rows).map(|k| k % 7));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(keys), Arc::new(values)]).unwrap();
        MemorySourceConfig::try_new_exec(&[vec![batch]], schema, None).unwrap()
    }

    fn filtered(
        predicate: Arc<dyn PhysicalExpr>,
        input: Arc<dyn ExecutionPlan>,
    ) -> Arc<dyn ExecutionPlan> {
        Arc::new(FilterExec::try_new(predicate, input).unwrap())
    }

    #[test]
    fn a_scan_is_read_in_place_when_what_it_reads_is_below_the_threshold() {
        let threshold = 32 << 20;
        let small = scan(1_000);
        let schema = small.schema();
        let v_is_3 = binary(col("v", &schema).unwrap(), Operator::Eq, lit(3i64), &schema).unwrap();
        assert!(scan_input_below(&small, threshold));
        assert!(scan_input_below(
            &filtered(v_is_3.clone(), small.clone()),
            threshold
        ));
        // Five million rows (80 MB) read to keep a seventh: read once, as a stage.
        let large = filtered(v_is_3.clone(), scan(5_000_000));
        assert!(!scan_input_below(&large, threshold));
        assert!(scan_input_below(&large, 128 << 20));
        // Not a scan: an aggregate, a join, a shuffle read.
        let one_row_per_key: Arc<dyn ExecutionPlan> =
            Arc::new(CoalescePartitionsExec::new(small.clone()));
        assert!(!scan_input_below(&one_row_per_key, threshold));
        // Each worker would draw its own rows.
        let random = Arc::new(
            ScalarFunctionExpr::try_new(
                datafusion::functions::math::random(),
                vec![],
                &schema,
                Arc::new(ConfigOptions::default()),
            )
            .unwrap(),
        );
        let coin = binary(random, Operator::Lt, lit(0.5f64), &schema).unwrap();
        assert!(!scan_input_below(&filtered(coin, small), threshold));
    }

    #[tokio::test]
    async fn a_build_side_with_a_volatile_filter_stays_a_stage() {
        let query = "SELECT dim.v, count(*) AS n FROM fact \
                     JOIN (SELECT * FROM dim WHERE random() < 2.0) dim ON fact.k = dim.k \
                     GROUP BY dim.v";
        let plan = plan(query, 1_000, 200_000, 1 << 30).await;
        let described = plan.describe();
        assert!(described.contains("random()"), "{described}");
        assert!(described.contains("broadcast=true"), "{described}");
    }
}
