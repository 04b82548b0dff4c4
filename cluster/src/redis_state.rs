//! The state store on Redis.
//!
//! Keys (all under the configured prefix):
//! - `<p>:job:<id>` hash: `state`, `detail`, `report` (JSON of the final report), `published`
//!   once its submission is on the queue, `pipeline`, `submitted_at`, `digest` (the request's)
//!   and `client`, the named API client that submitted it (absent: the shared namespace);
//! - `<p>:jobs` sorted set of every job id by submission time; `<p>:jobs@<client>` those a
//!   named client submitted;
//! - `<p>:idem:<key>`: what an idempotency key of the shared namespace is bound to (job,
//!   request digest, time); `<p>:idem@<client>:<key>` the same for a named client's key;
//! - `<p>:out:<id>` hash: `<stage>:<partition>` → the winning `TaskResult` (set with HSETNX,
//!   so the first result of a task wins even with two coordinators or duplicate results);
//! - `<p>:att:<id>` hash: `<stage>:<partition>` → the last attempt number handed out (HINCRBY);
//! - `<p>:owner:<id>`: the coordinator running the job (SET NX PX, renewed while it runs);
//! - `<p>:lease:<id>:<stage>:<partition>`: the attempt running a task (SET PX by its worker);
//! - `<p>:sweeps` sorted set of job ids by due time, `<p>:sweep-table` hash job → table: the
//!   late sweeps of ended jobs.
//!
//! Redis is not the record of what was committed (the Iceberg table is), so losing it
//! (FLUSHALL) can only make a job run its tasks again, never commit twice.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nightshift_core::error::{CoreError, Result};
use nightshift_core::ids::{JobId, StageId, TaskKey};
use nightshift_core::metrics;
use nightshift_core::redact::redact;
use nightshift_core::transport::{JobState, StateStore};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tracing::{info, warn};

use crate::config::redact_url;

/// The field of a job's record naming the API client that submitted it.
pub const OWNER_FIELD: &str = "client";

/// What a job's record says about its submission.
#[derive(Debug, Clone, Copy)]
pub struct Submitted<'a> {
    pub pipeline: &'a str,
    /// The named API client that submitted it; `None`: the shared namespace.
    pub owner: Option<&'a str>,
}

/// The `ZREVRANGE` bounds of `count` entries from `offset`, saturated: a page token of 2^64
/// overflowed the sum.
fn list_range(offset: usize, count: usize) -> (isize, isize) {
    let start = isize::try_from(offset).unwrap_or(isize::MAX);
    let count = isize::try_from(count).unwrap_or(isize::MAX);
    (start, start.saturating_add(count).saturating_sub(1))
}

/// The Redis key holding an idempotency key's binding: one namespace for the shared
/// clients, one per named client. A shared key is never a named client's (`idem:` against
/// `idem@`), whatever characters it holds.
fn idempotency_key_name(prefix: &str, owner: Option<&str>, key: &str) -> String {
    match owner {
        None => format!("{prefix}:idem:{key}"),
        Some(owner) => format!("{prefix}:idem@{owner}:{key}"),
    }
}

/// How long a process keeps trying to reach Redis when it starts.
const CONNECT_FOR: Duration = Duration::from_secs(120);

/// How long one command may wait for its answer. The client's default (500 ms) failed
/// whole jobs on a busy coordinator (a burst of jobs planning on two cores): a batch
/// system waits longer and lets readiness checks (3 s) report a Redis that hangs.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(5)))
}

/// Job and task state in Redis.
#[derive(Clone)]
pub struct RedisState {
    conn: ConnectionManager,
    prefix: String,
}

fn redis_err(e: redis::RedisError) -> CoreError {
    CoreError::Transport(format!("redis: {e}"))
}

impl RedisState {
    /// Connects, retrying for [`CONNECT_FOR`] while Redis is not up yet.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        let shown = redact_url(url);
        info!(url = %shown, "connecting to redis");
        let client = redis::Client::open(url).map_err(redis_err)?;
        let deadline = tokio::time::Instant::now() + CONNECT_FOR;
        let conn = loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(10),
                ConnectionManager::new_with_config(client.clone(), manager_config()),
            )
            .await
            .map_err(|_| CoreError::Transport(format!("redis: no answer from {shown}")))
            .and_then(|r| r.map_err(redis_err));
            match attempt {
                Ok(conn) => break conn,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    warn!(url = %shown, error = %e, "redis not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        };
        Ok(RedisState {
            conn,
            prefix: prefix.to_string(),
        })
    }

    /// Whether Redis answers (`PING`), for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(redis_err)
    }

    fn job_key(&self, job: &JobId) -> String {
        format!("{}:job:{job}", self.prefix)
    }

    fn lease_key(&self, job: &JobId, task: TaskKey) -> String {
        format!(
            "{}:lease:{job}:{}:{}",
            self.prefix, task.stage, task.partition
        )
    }

    fn outputs_key(&self, job: &JobId) -> String {
        format!("{}:out:{job}", self.prefix)
    }

    fn attempts_key(&self, job: &JobId) -> String {
        format!("{}:att:{job}", self.prefix)
    }

    fn owner_key(&self, job: &JobId) -> String {
        format!("{}:owner:{job}", self.prefix)
    }

    fn sweeps_key(&self) -> String {
        format!("{}:sweeps", self.prefix)
    }

    fn sweep_tables_key(&self) -> String {
        format!("{}:sweep-table", self.prefix)
    }

    /// Stores the final report of a job (JSON) next to its state.
    /// Stored redacted: anyone with the API's read access sees job records.
    pub async fn set_report(&self, job: &JobId, report: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.hset::<_, _, _, ()>(self.job_key(job), "report", redact(report).as_ref())
            .await
            .map_err(redis_err)
    }

    fn jobs_key(&self) -> String {
        format!("{}:jobs", self.prefix)
    }

    /// The jobs a named client submitted (besides their place in [`Self::jobs_key`]).
    fn jobs_key_of(&self, owner: &str) -> String {
        format!("{}:jobs@{owner}", self.prefix)
    }

    /// Binds an idempotency key to `binding` (what the job API stores: the job and the
    /// request's digest) unless it is bound already. Returns the earlier binding, or `None`
    /// when this call bound the key.
    pub async fn bind_idempotency_key(
        &self,
        owner: Option<&str>,
        key: &str,
        binding: &str,
    ) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(idempotency_key_name(&self.prefix, owner, key))
            .arg(binding)
            .arg("NX")
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(redis_err)
    }

    /// Frees an idempotency key if it is still bound to `binding` (a submission that could
    /// not be queued), so the client's retry starts afresh.
    pub async fn unbind_idempotency_key(
        &self,
        owner: Option<&str>,
        key: &str,
        binding: &str,
    ) -> Result<()> {
        self.delete_if_holds(&idempotency_key_name(&self.prefix, owner, key), binding)
            .await
    }

    /// Deletes `key` if it still holds `value`, in one step (a compare-and-delete).
    async fn delete_if_holds(&self, key: &str, value: &str) -> Result<()> {
        const DELETE_IF_HOLDS: &str = r"
            if redis.call('GET', KEYS[1]) == ARGV[1] then
                return redis.call('DEL', KEYS[1])
            end
            return 0";
        let mut conn = self.conn.clone();
        redis::Script::new(DELETE_IF_HOLDS)
            .key(key)
            .arg(value)
            .invoke_async::<i32>(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    /// Records that the job's submission reached the submission queue.
    pub async fn mark_published(&self, job: &JobId) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.hset(self.job_key(job), "published", "1")
            .await
            .map_err(redis_err)
    }

    /// Removes a job that was registered (for `owner`) but never queued.
    pub async fn forget_job(&self, job: &JobId, owner: Option<&str>) -> Result<()> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.job_key(job))
            .zrem(self.jobs_key(), job.as_str());
        if let Some(owner) = owner {
            pipe.zrem(self.jobs_key_of(owner), job.as_str());
        }
        pipe.query_async::<()>(&mut conn).await.map_err(redis_err)
    }

    /// Records a submitted job (state `queued`) in the job list, with the digest of the
    /// request that submitted it.
    pub async fn register_job(
        &self,
        job: &JobId,
        submitted: &Submitted<'_>,
        submitted_at_ms: i64,
        digest: &str,
    ) -> Result<()> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(
                self.job_key(job),
                &[
                    ("pipeline", submitted.pipeline.to_string()),
                    ("submitted_at", submitted_at_ms.to_string()),
                    ("state", JobState::Queued.as_str().to_string()),
                    ("digest", digest.to_string()),
                ],
            )
            .zadd(self.jobs_key(), job.as_str(), submitted_at_ms);
        // A rerun under the same id is the submitter's now.
        match submitted.owner {
            Some(owner) => pipe.hset(self.job_key(job), OWNER_FIELD, owner).zadd(
                self.jobs_key_of(owner),
                job.as_str(),
                submitted_at_ms,
            ),
            None => pipe.hdel(self.job_key(job), OWNER_FIELD),
        };
        pipe.query_async::<()>(&mut conn).await.map_err(redis_err)
    }

    /// Writes again who submitted `job` and its pipeline, where the job's record may have
    /// been lost (Redis flushed or restarted) and written again by state changes alone: the
    /// owner decides which API callers see the job.
    pub async fn keep_submitter(&self, job: &JobId, submitted: &Submitted<'_>) -> Result<()> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.hset_nx(self.job_key(job), "pipeline", submitted.pipeline);
        if let Some(owner) = submitted.owner {
            pipe.hset(self.job_key(job), OWNER_FIELD, owner);
        }
        pipe.query_async::<()>(&mut conn).await.map_err(redis_err)
    }

    /// Tasks done and total, for progress reports.
    /// Records task progress; `stages` is the per-stage JSON the job API returns.
    pub async fn set_progress(
        &self,
        job: &JobId,
        done: usize,
        total: usize,
        stages: &str,
    ) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.hset_multiple::<_, _, _, ()>(
            self.job_key(job),
            &[
                ("tasks_done", done.to_string()),
                ("tasks_total", total.to_string()),
                ("stages", stages.to_string()),
            ],
        )
        .await
        .map_err(redis_err)
    }

    /// Every field of a job's record (empty if unknown).
    pub async fn job_record(
        &self,
        job: &JobId,
    ) -> Result<std::collections::HashMap<String, String>> {
        let mut conn = self.conn.clone();
        conn.hgetall(self.job_key(job)).await.map_err(redis_err)
    }

    /// Job ids, newest first, from `offset`: every job's, or (`owner`) those a named
    /// client submitted, so that its pages neither count nor read through other clients'
    /// jobs.
    pub async fn list_jobs(
        &self,
        owner: Option<&str>,
        offset: usize,
        count: usize,
    ) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let key = match owner {
            None => self.jobs_key(),
            Some(owner) => self.jobs_key_of(owner),
        };
        let (start, stop) = list_range(offset, count);
        conn.zrevrange(key, start, stop).await.map_err(redis_err)
    }

    /// Stores what the job's report page draws (its `RunRecord`, as JSON).
    pub async fn set_run_record(&self, job: &JobId, record_json: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.hset(self.job_key(job), "run_record", record_json)
            .await
            .map_err(redis_err)
    }

    /// The job's stored `RunRecord` JSON, once it has ended.
    pub async fn run_record(&self, job: &JobId) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        conn.hget(self.job_key(job), "run_record")
            .await
            .map_err(redis_err)
    }

    /// Forgets the stored outcome (and report record) of `job`, and a cancel asked of its
    /// last run, before it is submitted again.
    pub async fn clear_report(&self, job: &JobId) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.hdel::<_, _, ()>(self.job_key(job), &["report", "run_record", "cancel"])
            .await
            .map_err(redis_err)
    }

    pub async fn report(&self, job: &JobId) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        conn.hget(self.job_key(job), "report")
            .await
            .map_err(redis_err)
    }
}

#[async_trait]
impl StateStore for RedisState {
    async fn set_job_state(&self, job: &JobId, state: JobState, detail: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.hset_multiple::<_, _, _, ()>(
            self.job_key(job),
            &[
                ("state", state.as_str()),
                ("detail", redact(detail).as_ref()),
            ],
        )
        .await
        .map_err(redis_err)?;
        metrics::job_state_changed(job.as_str(), state);
        Ok(())
    }

    async fn job_state(&self, job: &JobId) -> Result<Option<(JobState, String)>> {
        let mut conn = self.conn.clone();
        let (state, detail): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.job_key(job))
            .arg("state")
            .arg("detail")
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(state
            .as_deref()
            .and_then(JobState::parse)
            .map(|s| (s, detail.unwrap_or_default())))
    }

    async fn claim_task_output(&self, job: &JobId, task: TaskKey, result: Bytes) -> Result<bool> {
        let mut conn = self.conn.clone();
        let field = format!("{}:{}", task.stage, task.partition);
        conn.hset_nx(self.outputs_key(job), field, result.as_ref())
            .await
            .map_err(redis_err)
    }

    async fn task_outputs(&self, job: &JobId) -> Result<Vec<(TaskKey, Bytes)>> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, Vec<u8>)> = conn
            .hgetall(self.outputs_key(job))
            .await
            .map_err(redis_err)?;
        Ok(all
            .into_iter()
            .filter_map(|(field, value)| {
                let (stage, partition) = field.split_once(':')?;
                Some((
                    TaskKey {
                        stage: StageId(stage.parse().ok()?),
                        partition: partition.parse().ok()?,
                    },
                    Bytes::from(value),
                ))
            })
            .collect())
    }

    async fn forget_task_outputs(&self, job: &JobId, tasks: &[TaskKey]) -> Result<()> {
        if tasks.is_empty() {
            return Ok(());
        }
        let fields: Vec<String> = tasks
            .iter()
            .map(|task| format!("{}:{}", task.stage, task.partition))
            .collect();
        let mut conn = self.conn.clone();
        conn.hdel::<_, _, ()>(self.outputs_key(job), fields)
            .await
            .map_err(redis_err)
    }

    async fn clear_task_outputs(&self, job: &JobId) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(&[self.outputs_key(job), self.attempts_key(job)])
            .await
            .map_err(redis_err)
    }

    async fn next_attempts(&self, job: &JobId, tasks: &[TaskKey]) -> Result<Vec<u32>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let key = self.attempts_key(job);
        let mut pipe = redis::pipe();
        for task in tasks {
            pipe.hincr(&key, format!("{}:{}", task.stage, task.partition), 1);
        }
        pipe.query_async(&mut conn).await.map_err(redis_err)
    }

    async fn acquire_job(
        &self,
        job: &JobId,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<bool> {
        // Take the key when free, or extend it when it is already ours, in one step.
        const ACQUIRE: &str = r"
            local holder = redis.call('GET', KEYS[1])
            if holder == false or holder == ARGV[1] then
                redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
                return 1
            end
            return 0";
        let mut conn = self.conn.clone();
        let taken: i32 = redis::Script::new(ACQUIRE)
            .key(self.owner_key(job))
            .arg(owner)
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(taken == 1)
    }

    async fn release_job(&self, job: &JobId, owner: &str) -> Result<()> {
        self.delete_if_holds(&self.owner_key(job), owner).await
    }

    async fn schedule_sweep(&self, job: &JobId, table: &str, due_ms: i64) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset(self.sweep_tables_key(), job.as_str(), table)
            .zadd(self.sweeps_key(), job.as_str(), due_ms)
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn due_sweeps(&self, now_ms: i64) -> Result<Vec<(JobId, String)>> {
        let mut conn = self.conn.clone();
        let due: Vec<String> = conn
            .zrangebyscore(self.sweeps_key(), "-inf", now_ms)
            .await
            .map_err(redis_err)?;
        let mut out = Vec::new();
        for id in due {
            let table: Option<String> = conn
                .hget(self.sweep_tables_key(), &id)
                .await
                .map_err(redis_err)?;
            match (JobId::parse(&id), table) {
                (Ok(job), Some(table)) => out.push((job, table)),
                _ => {
                    warn!(job_id = %id, "malformed sweep record dropped");
                    conn.zrem::<_, _, ()>(self.sweeps_key(), &id)
                        .await
                        .map_err(redis_err)?;
                }
            }
        }
        Ok(out)
    }

    async fn sweep_done(&self, job: &JobId) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .zrem(self.sweeps_key(), job.as_str())
            .hdel(self.sweep_tables_key(), job.as_str())
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn renew_lease(
        &self,
        job: &JobId,
        task: TaskKey,
        attempt: u32,
        worker: &str,
        ttl: std::time::Duration,
    ) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.lease_key(job, task))
            .arg(format!("{attempt}:{worker}"))
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn request_cancel(&self, job: &JobId) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.hset::<_, _, _, ()>(self.job_key(job), "cancel", "1")
            .await
            .map_err(redis_err)
    }

    async fn cancel_requested(&self, job: &JobId) -> Result<bool> {
        let mut conn = self.conn.clone();
        let flag: Option<String> = conn
            .hget(self.job_key(job), "cancel")
            .await
            .map_err(redis_err)?;
        Ok(flag.is_some())
    }

    async fn lease(&self, job: &JobId, task: TaskKey) -> Result<Option<u32>> {
        let mut conn = self.conn.clone();
        let value: Option<String> = conn
            .get(self.lease_key(job, task))
            .await
            .map_err(redis_err)?;
        Ok(value.and_then(|v| v.split(':').next().and_then(|a| a.parse().ok())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_range_never_overflows() {
        assert_eq!(list_range(0, 50), (0, 49));
        assert_eq!(list_range(100, 1), (100, 100));
        // Past every list: an empty range, not an overflow.
        assert_eq!(list_range(usize::MAX, 50), (isize::MAX, isize::MAX - 1));
        assert_eq!(
            list_range(isize::MAX as usize - 10, 500),
            (isize::MAX - 10, isize::MAX - 1)
        );
    }

    #[test]
    fn each_named_client_binds_keys_in_its_own_namespace() {
        assert_eq!(idempotency_key_name("p", None, "k"), "p:idem:k");
        assert_eq!(
            idempotency_key_name("p", Some("alice"), "k"),
            "p:idem@alice:k"
        );
        // A shared key spelling out a namespace is still the shared namespace's.
        assert_ne!(
            idempotency_key_name("p", None, "@alice:k"),
            idempotency_key_name("p", Some("alice"), "k")
        );
        assert_ne!(
            idempotency_key_name("p", Some("alice"), "k"),
            idempotency_key_name("p", Some("alice2"), "k")
        );
    }
}
