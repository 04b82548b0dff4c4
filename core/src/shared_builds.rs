//! Broadcast hash tables built once per process: the tasks of a stage that run in one worker
//! share each broadcast join's hash table instead of each building its own.
//!
//! Every task of a stage decodes its own copy of the stage plan, and a broadcast join
//! (`HashJoinExec` in `CollectLeft` mode) has the same build side in every copy: a broadcast
//! shuffle read whole, or a scan of a small table. DataFusion builds such a join's table once
//! per plan instance, in a future that all the instance's partitions await, and a copy made
//! with `with_new_children` keeps that future. So the first task of a stage in this process
//! leaves its join here (with an empty probe side), and the stage's later tasks in this
//! process put their own probe side under it: one build per stage and worker, not one per
//! task.
//!
//! - The key is the job, the stage and the join serialized with an empty probe side: the
//!   build side's plan (its files or shuffle segments, its filters), the keys, the join type.
//!   Any difference builds a table of its own.
//! - Only joins that never emit build rows after the probe (inner, right, right semi and
//!   anti) share: their table is read-only while it is probed.
//! - An entry lives while a task uses it and [`KEEP_IDLE`] after, at most [`MAX_IDLE`]
//!   idle entries at once; its memory stays reserved in the process's pool meanwhile.
//! - A task that fails drops the entries it used: a failed build keeps its error in its
//!   future, and the retry must build again.
//! - The embedded mode's shared plan ([`crate::shared_plan`]) is one instance already and is
//!   left alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datafusion::error::Result;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};

use crate::codec::encode_plan;
use crate::joins::emits_build_rows_at_end;
use crate::shared_plan::SharedPlanExec;

/// How long a table no task uses is kept for the next task of its stage. The tasks of a stage
/// are queued together, so the next one arrives within milliseconds.
pub const KEEP_IDLE: Duration = Duration::from_secs(10);
/// At most this many tables no task uses are kept; the least recently used go first.
pub const MAX_IDLE: usize = 2;

/// The process's shared broadcast builds. A session carries one as a config extension
/// ([`crate::session::new_session`]); a worker's tasks all run in its one session.
#[derive(Debug, Default)]
pub struct SharedBuilds {
    entries: Mutex<HashMap<BuildKey, Entry>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BuildKey {
    job: String,
    stage: u32,
    join: Bytes,
}

#[derive(Debug)]
struct Entry {
    /// The first task's join, its probe side replaced by an empty plan.
    join: Arc<dyn ExecutionPlan>,
    users: usize,
    last_used: Instant,
}

/// The tables a task uses, released when it is dropped.
#[derive(Debug, Default)]
pub struct BuildLease {
    builds: Option<Arc<SharedBuilds>>,
    used: Vec<(BuildKey, Arc<dyn ExecutionPlan>)>,
    reused: Vec<Arc<dyn ExecutionPlan>>,
}

impl SharedBuilds {
    /// `plan` with each shareable broadcast join's build side shared with the other tasks of
    /// `job`'s `stage` in this process, and the lease that holds those tables for the task.
    pub fn share(
        self: &Arc<Self>,
        job: &str,
        stage: u32,
        plan: Arc<dyn ExecutionPlan>,
    ) -> Result<(Arc<dyn ExecutionPlan>, BuildLease)> {
        self.drop_idle_now();
        let mut lease = BuildLease {
            builds: Some(Arc::clone(self)),
            used: Vec::new(),
            reused: Vec::new(),
        };
        let plan = self.share_node(job, stage, plan, &mut lease)?;
        if !lease.used.is_empty() {
            tracing::debug!(
                joins = lease.used.len(),
                shared = lease.reused.len(),
                "broadcast join tables"
            );
        }
        Ok((plan, lease))
    }

    fn share_node(
        &self,
        job: &str,
        stage: u32,
        node: Arc<dyn ExecutionPlan>,
        lease: &mut BuildLease,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if node.as_any().is::<SharedPlanExec>() {
            return Ok(node);
        }
        if let Some((build, probe)) = shareable_join(&node) {
            let probe = self.share_node(job, stage, probe, lease)?;
            let empty: Arc<dyn ExecutionPlan> = Arc::new(EmptyExec::new(probe.schema()));
            let template = Arc::clone(&node).with_new_children(vec![Arc::clone(&build), empty])?;
            let Ok(bytes) = encode_plan(Arc::clone(&template)) else {
                return node.with_new_children(vec![build, probe]);
            };
            let key = BuildKey {
                job: job.to_string(),
                stage,
                join: bytes,
            };
            let (shared, reused) = self.acquire(key.clone(), template);
            crate::metrics::broadcast_join(reused);
            let build = Arc::clone(shared.children()[0]);
            if reused {
                lease.reused.push(Arc::clone(&build));
            }
            lease.used.push((key, Arc::clone(&shared)));
            return shared.with_new_children(vec![build, probe]);
        }
        let children: Vec<Arc<dyn ExecutionPlan>> = node.children().into_iter().cloned().collect();
        if children.is_empty() {
            return Ok(node);
        }
        let shared = children
            .iter()
            .map(|child| self.share_node(job, stage, Arc::clone(child), lease))
            .collect::<Result<Vec<_>>>()?;
        if shared.iter().zip(&children).all(|(a, b)| Arc::ptr_eq(a, b)) {
            return Ok(node);
        }
        node.with_new_children(shared)
    }

    /// The entry of `key`, made of `template` if there is none; and whether it existed.
    fn acquire(
        &self,
        key: BuildKey,
        template: Arc<dyn ExecutionPlan>,
    ) -> (Arc<dyn ExecutionPlan>, bool) {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("shared builds lock");
        let mut reused = true;
        let entry = entries.entry(key).or_insert_with(|| {
            reused = false;
            Entry {
                join: template,
                users: 0,
                last_used: now,
            }
        });
        entry.users += 1;
        entry.last_used = now;
        (Arc::clone(&entry.join), reused)
    }

    /// Drops the entries that have been idle too long, or too many.
    pub fn drop_idle_now(&self) {
        drop_idle(
            &mut self.entries.lock().expect("shared builds lock"),
            Instant::now(),
        );
    }

    /// How many tables this process holds (in use or idle).
    pub fn len(&self) -> usize {
        self.entries.lock().expect("shared builds lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The build and probe sides of `node` if it is a broadcast join whose table can be shared:
/// a hash join that collects its build side once (`CollectLeft`) and never emits build rows.
fn shareable_join(
    node: &Arc<dyn ExecutionPlan>,
) -> Option<(Arc<dyn ExecutionPlan>, Arc<dyn ExecutionPlan>)> {
    let join = node.as_any().downcast_ref::<HashJoinExec>()?;
    (*join.partition_mode() == PartitionMode::CollectLeft
        && !emits_build_rows_at_end(*join.join_type()))
    .then(|| (Arc::clone(join.left()), Arc::clone(join.right())))
}

fn drop_idle(entries: &mut HashMap<BuildKey, Entry>, now: Instant) {
    let candidates = entries
        .iter()
        .map(|(key, entry)| (key.clone(), entry.users, entry.last_used));
    for key in idle_entries_to_drop(candidates, now, KEEP_IDLE, MAX_IDLE) {
        entries.remove(&key);
    }
}

/// Of entries `(key, users, last used)`, the keys to drop: every entry no task uses that has
/// been idle for `keep` or longer, then the least recently used idle ones beyond `max_idle`.
fn idle_entries_to_drop<K>(
    entries: impl IntoIterator<Item = (K, usize, Instant)>,
    now: Instant,
    keep: Duration,
    max_idle: usize,
) -> Vec<K> {
    let mut idle: Vec<(K, Instant)> = entries
        .into_iter()
        .filter(|(_, users, _)| *users == 0)
        .map(|(key, _, last_used)| (key, last_used))
        .collect();
    idle.sort_by_key(|(_, last_used)| std::cmp::Reverse(*last_used));
    idle.into_iter()
        .enumerate()
        .filter(|(rank, (_, last_used))| {
            *rank >= max_idle || now.saturating_duration_since(*last_used) >= keep
        })
        .map(|(_, (key, _))| key)
        .collect()
}

impl BuildLease {
    /// The build sides this task took from an earlier task: their scans' metrics count that
    /// task's reads, not this one's.
    pub fn reused_build_sides(&self) -> &[Arc<dyn ExecutionPlan>] {
        &self.reused
    }

    /// The task failed: drop the tables it used, so that a retry builds them again (a failed
    /// build keeps its error).
    pub fn failed(mut self) {
        let Some(builds) = self.builds.take() else {
            return;
        };
        let mut entries = builds.entries.lock().expect("shared builds lock");
        for (key, join) in self.used.drain(..) {
            if entries
                .get(&key)
                .is_some_and(|e| Arc::ptr_eq(&e.join, &join))
            {
                entries.remove(&key);
            }
        }
    }
}

impl Drop for BuildLease {
    fn drop(&mut self) {
        let Some(builds) = self.builds.take() else {
            return;
        };
        if self.used.is_empty() {
            return;
        }
        let now = Instant::now();
        {
            let mut entries = builds.entries.lock().expect("shared builds lock");
            for (key, join) in self.used.drain(..) {
                if let Some(entry) = entries.get_mut(&key)
                    && Arc::ptr_eq(&entry.join, &join)
                {
                    entry.users = entry.users.saturating_sub(1);
                    entry.last_used = now;
                }
            }
        }
        // An idle worker gets no next task to drop the table: drop it when its time is up.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                tokio::time::sleep(KEEP_IDLE).await;
                builds.drop_idle_now();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{SessionOptions, new_session};
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::physical_plan::ExecutionPlanProperties;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};

    /// `dim(k, name)`: keys 0..100; `fact(k)`: two files of 1,000 rows, keys 0..100.
    async fn tables(dir: &std::path::Path) -> (String, String) {
        let writer = SessionContext::new();
        let dim = dir.join("dim.parquet").display().to_string();
        let fact = dir.join("fact").display().to_string();
        std::fs::create_dir(&fact).unwrap();
        let mut copies = vec![format!(
            "COPY (SELECT value AS k, 'näme ' || value AS name FROM generate_series(0, 99)) TO '{dim}' STORED AS PARQUET"
        )];
        for file in ["a", "b"] {
            copies.push(format!(
                "COPY (SELECT value % 100 AS k FROM generate_series(0, 999)) TO '{fact}/{file}.parquet' STORED AS PARQUET"
            ));
        }
        for copy in copies {
            writer.sql(&copy).await.unwrap().collect().await.unwrap();
        }
        (dim, fact)
    }

    /// The stage plan, encoded as the coordinator sends it.
    async fn stage_plan(ctx: &SessionContext) -> Bytes {
        let sql = "SELECT f.k, d.name FROM fact f JOIN dim d ON f.k = d.k";
        let plan = ctx
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        encode_plan(plan).unwrap()
    }

    /// A task's own copy of the stage plan, as a worker decodes one per task.
    fn task_plan(stage_plan: &[u8], ctx: &SessionContext) -> Arc<dyn ExecutionPlan> {
        crate::codec::decode_plan(stage_plan, &ctx.task_ctx()).unwrap()
    }

    fn broadcast_joins(plan: &Arc<dyn ExecutionPlan>) -> usize {
        let mut joins = 0;
        plan.apply(|node| {
            if let Some(join) = node.as_any().downcast_ref::<HashJoinExec>()
                && *join.partition_mode() == PartitionMode::CollectLeft
            {
                joins += 1;
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
        joins
    }

    async fn rows(
        plan: &Arc<dyn ExecutionPlan>,
        partition: usize,
        ctx: &SessionContext,
    ) -> Result<usize> {
        let stream = plan.execute(partition, ctx.task_ctx())?;
        let batches = datafusion::physical_plan::common::collect(stream).await?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    #[tokio::test]
    async fn the_next_task_of_a_stage_probes_the_table_the_first_one_built() {
        let dir = tempfile::tempdir().unwrap();
        let (dim, fact) = tables(dir.path()).await;
        let ctx = new_session(SessionOptions {
            partitions: 2,
            ..SessionOptions::default()
        });
        ctx.sql("SET datafusion.optimizer.enable_round_robin_repartition = false")
            .await
            .unwrap();
        ctx.register_parquet("dim", &dim, ParquetReadOptions::default())
            .await
            .unwrap();
        ctx.register_parquet("fact", &fact, ParquetReadOptions::default())
            .await
            .unwrap();
        let stage_plan = stage_plan(&ctx).await;
        let (first, second, other_job) = (
            task_plan(&stage_plan, &ctx),
            task_plan(&stage_plan, &ctx),
            task_plan(&stage_plan, &ctx),
        );
        assert_eq!(
            broadcast_joins(&first),
            1,
            "{}",
            datafusion::physical_plan::displayable(first.as_ref()).indent(true)
        );
        assert_eq!(first.output_partitioning().partition_count(), 2);
        let builds = ctx
            .state()
            .config()
            .get_extension::<SharedBuilds>()
            .expect("the session carries the process's builds");

        let (first, lease) = builds.share("job-1", 3, first).unwrap();
        assert!(lease.reused_build_sides().is_empty());
        let first_rows = rows(&first, 0, &ctx).await.unwrap();
        drop(lease);
        // The build side is gone: only a task that does not read it again can finish.
        std::fs::remove_file(&dim).unwrap();

        let (second, lease) = builds.share("job-1", 3, second).unwrap();
        assert_eq!(lease.reused_build_sides().len(), 1);
        let second_rows = rows(&second, 1, &ctx).await.unwrap();
        assert_eq!(
            first_rows + second_rows,
            2_000,
            "every fact row matches one dim row"
        );
        drop(lease);

        // Another job's task builds its own table, and fails to: the file is gone.
        let (other_job, lease) = builds.share("job-2", 3, other_job).unwrap();
        assert!(lease.reused_build_sides().is_empty());
        let failed = rows(&other_job, 0, &ctx).await.unwrap_err();
        assert!(failed.to_string().contains("dim.parquet"), "{failed}");
        assert_eq!(builds.len(), 2);
        lease.failed();
        assert_eq!(builds.len(), 1, "a failed task's table is not kept");
    }

    fn at(base: Instant, secs: u64) -> Instant {
        base + Duration::from_secs(secs)
    }

    #[test]
    fn an_idle_entry_is_dropped_once_its_time_is_up_and_one_in_use_never() {
        let t0 = Instant::now();
        let keep = Duration::from_secs(10);
        let entries = vec![
            ("idle 11 s", 0, t0),
            ("idle 9 s", 0, at(t0, 2)),
            ("in use", 1, t0),
        ];
        assert_eq!(
            idle_entries_to_drop(entries, at(t0, 11), keep, 5),
            vec!["idle 11 s"]
        );
    }

    #[test]
    fn beyond_the_idle_limit_the_least_recently_used_go_first() {
        let t0 = Instant::now();
        let keep = Duration::from_secs(60);
        let entries = vec![
            ("oldest", 0, t0),
            ("newest", 0, at(t0, 3)),
            ("middle", 0, at(t0, 2)),
            ("in use, older", 2, t0),
        ];
        let mut dropped = idle_entries_to_drop(entries, at(t0, 4), keep, 1);
        dropped.sort();
        assert_eq!(dropped, vec!["middle", "oldest"]);
    }
}
