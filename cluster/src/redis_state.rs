//! The state store on Redis.
//!
//! Keys (all under the configured prefix):
//! - `<p>:job:<id>` hash: `state`, `detail`, `report` (JSON of the final report);
//! - `<p>:out:<id>` hash: `<stage>:<partition>` → the winning `TaskResult` (set with HSETNX,
//!   so the first result of a task wins even with two coordinators or duplicate results).
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

    /// Binds an idempotency key to `job` unless it is bound already; returns the job it is
    /// bound to (`job` itself when this call bound it).
    pub async fn bind_idempotency_key(&self, key: &str, job: &JobId) -> Result<String> {
        let mut conn = self.conn.clone();
        let previous: Option<String> = redis::cmd("SET")
            .arg(format!("{}:idem:{key}", self.prefix))
            .arg(job.as_str())
            .arg("NX")
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(previous.unwrap_or_else(|| job.to_string()))
    }

    /// Records a submitted job (state `queued`) in the job list.
    pub async fn register_job(
        &self,
        job: &JobId,
        pipeline: &str,
        submitted_at_ms: i64,
    ) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset_multiple(
                self.job_key(job),
                &[
                    ("pipeline", pipeline.to_string()),
                    ("submitted_at", submitted_at_ms.to_string()),
                    ("state", "queued".to_string()),
                ],
            )
            .zadd(self.jobs_key(), job.as_str(), submitted_at_ms)
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
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

    /// Job ids, newest first, from `offset`.
    pub async fn list_jobs(&self, offset: usize, count: usize) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        conn.zrevrange(
            self.jobs_key(),
            offset as isize,
            (offset + count) as isize - 1,
        )
        .await
        .map_err(redis_err)
    }

    /// Forgets the stored outcome of `job` before it is submitted again.
    pub async fn clear_report(&self, job: &JobId) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.hdel::<_, _, ()>(self.job_key(job), "report")
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

fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Running => "running",
        JobState::Committing => "committing",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
    }
}

fn parse_state(name: &str) -> Option<JobState> {
    Some(match name {
        "running" => JobState::Running,
        "committing" => JobState::Committing,
        "succeeded" => JobState::Succeeded,
        "failed" => JobState::Failed,
        _ => return None,
    })
}

#[async_trait]
impl StateStore for RedisState {
    async fn set_job_state(&self, job: &JobId, state: JobState, detail: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.hset_multiple::<_, _, _, ()>(
            self.job_key(job),
            &[
                ("state", state_name(state)),
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
            .and_then(parse_state)
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

    async fn clear_task_outputs(&self, job: &JobId) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(self.outputs_key(job))
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
