//! The embedded fast path's exchange: one plan instance shared by every task of a stage that
//! runs in this process.
//!
//! A DataFusion plan exchanges rows between its partitions in memory (`RepartitionExec`),
//! and a broadcast join builds its hash table once for all partitions, but only when every
//! partition is executed on the same plan instance. Tasks normally decode their own copy of
//! the stage plan. In the embedded mode the coordinator and the workers share a process, so
//! the planner registers the whole plan here and the stage plan carries only a key
//! ([`SharedPlanExec`]); every worker decoding it gets the same instance and runs its
//! partition of it. No shuffle files, no stage boundaries, one hash table per broadcast.
//!
//! A partition runs at most once: a retried task fails instead of reading an exchange that
//! was already drained, so a retry can never commit missing rows.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};

/// Plans of running embedded jobs, by key. Weak: a plan lives as long as its job plan.
static REGISTRY: LazyLock<Mutex<HashMap<String, Weak<SharedPlanExec>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A plan whose partitions are run by several tasks of this process on one instance.
pub struct SharedPlanExec {
    key: String,
    inner: Arc<dyn ExecutionPlan>,
    started: Mutex<HashSet<usize>>,
}

impl fmt::Debug for SharedPlanExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedPlanExec({})", self.key)
    }
}

impl SharedPlanExec {
    /// Registers `inner` for the tasks of this process.
    pub fn register(inner: Arc<dyn ExecutionPlan>) -> Arc<SharedPlanExec> {
        let key = uuid::Uuid::new_v4().simple().to_string();
        let shared = Arc::new(SharedPlanExec {
            key: key.clone(),
            inner,
            started: Mutex::new(HashSet::new()),
        });
        let mut registry = REGISTRY.lock().expect("registry lock");
        registry.retain(|_, plan| plan.strong_count() > 0);
        registry.insert(key, Arc::downgrade(&shared));
        shared
    }

    /// The registered plan of `key`, if its job is still running in this process.
    pub fn lookup(key: &str) -> Result<Arc<SharedPlanExec>> {
        REGISTRY
            .lock()
            .expect("registry lock")
            .get(key)
            .and_then(Weak::upgrade)
            .ok_or_else(|| {
                DataFusionError::Execution(format!(
                    "the single-process plan {key} is not registered in this process (it runs only where it was planned)"
                ))
            })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn inner(&self) -> &Arc<dyn ExecutionPlan> {
        &self.inner
    }
}

impl DisplayAs for SharedPlanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match t {
            DisplayFormatType::TreeRender => write!(f, "shared"),
            _ => write!(f, "SharedPlanExec: in-process, one instance for all tasks"),
        }
    }
}

impl ExecutionPlan for SharedPlanExec {
    fn name(&self) -> &str {
        "SharedPlanExec"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.inner]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.as_slice() {
            [child] if Arc::ptr_eq(child, &self.inner) => Ok(self),
            // A rewritten plan is another plan: it is no longer the shared instance.
            [child] => Ok(child.clone()),
            _ => Err(DataFusionError::Internal(
                "SharedPlanExec has one child".into(),
            )),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if !self.started.lock().expect("started lock").insert(partition) {
            return Err(DataFusionError::Execution(format!(
                "partition {partition} of the single-process plan ran already and cannot run again; run the job again"
            )));
        }
        self.inner
            .execute(partition, Arc::new(single_process_context(&context)))
    }
}

/// `context` with the settings of the single-process mode
/// ([`crate::session::single_process_config`]).
fn single_process_context(context: &TaskContext) -> TaskContext {
    TaskContext::new(
        context.task_id(),
        context.session_id(),
        crate::session::single_process_config(context.session_config()),
        context.scalar_functions().clone(),
        context.aggregate_functions().clone(),
        context.window_functions().clone(),
        context.runtime_env(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{
        SINGLE_PROCESS_PARTIAL_AGGREGATE_PROBE_ROWS, SessionOptions, new_session,
    };
    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::common::tree_node::TreeNode;
    use datafusion::datasource::MemTable;
    use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
    use datafusion::physical_plan::collect;
    use datafusion::prelude::SessionContext;

    /// A session over `t(k)`: two partitions of `rows` rows each, key `key(row)`.
    fn session_over(rows: usize, key: impl Fn(usize) -> i64) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let partition = |first: usize| {
            (first..first + rows)
                .step_by(8192)
                .map(|start| {
                    let keys = (start..(start + 8192).min(first + rows)).map(&key);
                    RecordBatch::try_new(
                        schema.clone(),
                        vec![Arc::new(keys.collect::<Int64Array>())],
                    )
                    .unwrap()
                })
                .collect::<Vec<_>>()
        };
        let table = MemTable::try_new(schema.clone(), vec![partition(0), partition(rows)]).unwrap();
        let ctx = new_session(SessionOptions {
            partitions: 2,
            ..SessionOptions::default()
        });
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx
    }

    /// Rows the plan's partial aggregate passed on without aggregating them.
    fn skipped_rows(plan: &Arc<dyn ExecutionPlan>) -> usize {
        let mut skipped = 0;
        plan.apply(|node| {
            if let Some(agg) = node.as_any().downcast_ref::<AggregateExec>()
                && *agg.mode() == AggregateMode::Partial
            {
                skipped += agg
                    .metrics()
                    .and_then(|m| m.sum_by_name("skipped_aggregation_rows"))
                    .map_or(0, |v| v.as_usize());
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })
        .unwrap();
        skipped
    }

    /// Groups and the sum of their counts, and the rows the partial aggregate skipped, of
    /// `SELECT k, COUNT(*) FROM t GROUP BY k` run plainly and as a shared plan.
    async fn count_by_key(ctx: &SessionContext, shared: bool) -> (usize, i64, usize) {
        let sql = "SELECT k, COUNT(*) AS n FROM t GROUP BY k";
        let plan = ctx
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let run: Arc<dyn ExecutionPlan> = if shared {
            SharedPlanExec::register(plan.clone())
        } else {
            plan.clone()
        };
        let batches = collect(run, ctx.task_ctx()).await.unwrap();
        let groups = batches.iter().map(|b| b.num_rows()).sum();
        let counted = batches
            .iter()
            .flat_map(|b| {
                b.column(1)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .iter()
            })
            .map(Option::unwrap)
            .sum();
        (groups, counted, skipped_rows(&plan))
    }

    #[tokio::test]
    async fn a_partial_aggregate_that_shrinks_rows_less_than_tenfold_is_skipped_in_one_process() {
        // Four rows per key, in key order (as lineitem is by order): a partial aggregate
        // would keep a group for every fourth row. DataFusion's default (skip at 0.8 groups
        // per row) keeps it; the single-process rule (0.1 after a million rows) skips it.
        let rows = SINGLE_PROCESS_PARTIAL_AGGREGATE_PROBE_ROWS + 100_000;
        let ctx = session_over(rows, |row| (row / 4) as i64);
        let expected = (2 * rows / 4, 2 * rows as i64);

        let (groups, counted, skipped) = count_by_key(&ctx, false).await;
        assert_eq!((groups, counted), expected);
        assert_eq!(skipped, 0, "plain DataFusion keeps the partial aggregate");

        let (groups, counted, skipped) = count_by_key(&ctx, true).await;
        assert_eq!((groups, counted), expected, "same groups and counts");
        assert!(
            skipped > 0,
            "the shared plan's partial aggregate skipped rows"
        );
    }

    #[tokio::test]
    async fn a_partial_aggregate_that_shrinks_rows_tenfold_is_kept_in_one_process() {
        // 50 k keys in turn: over the first 100 k rows half are new groups (a sample that
        // short would skip at 0.1), over the first million one in twenty.
        let rows = SINGLE_PROCESS_PARTIAL_AGGREGATE_PROBE_ROWS + 100_000;
        let ctx = session_over(rows, |row| (row % 50_000) as i64);
        let (groups, counted, skipped) = count_by_key(&ctx, true).await;
        assert_eq!((groups, counted), (50_000, 2 * rows as i64));
        assert_eq!(skipped, 0, "the partial aggregate kept aggregating");
    }
}
