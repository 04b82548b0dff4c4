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
        self.inner.execute(partition, context)
    }
}
