//! The cluster side of the CLI: the coordinator and worker processes, and
//! `nightshift run --cluster`, which submits a job and waits for its outcome.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nightshift_cluster::admin::{
    ObjectStoreDependency, RabbitDependency, Readiness, RedisDependency, serve_admin,
};
use nightshift_cluster::poll::poll_delay;
use nightshift_cluster::submission::JobSubmission;
use nightshift_cluster::{ClusterConfig, DeadFate, DeadTask, RabbitQueue, RedisState};
use nightshift_core::CoreError;
use nightshift_core::ids::JobId;
use nightshift_core::session::{SessionOptions, human_bytes, new_session};
use nightshift_worker::{StopConsuming, Worker};

/// Operations settings of a worker process.
#[derive(Debug, Clone)]
pub struct WorkerOps {
    /// Where to serve `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How long a running task may take to finish after SIGTERM before it is requeued.
    pub drain_grace: Duration,
}

/// Runs a worker until its queue closes, the broker goes away, or SIGTERM (then it drains:
/// see [`Worker::run_until`]).
pub async fn run_worker(config: &ClusterConfig, id: &str, ops: WorkerOps) -> Result<(), CoreError> {
    let (_, scratch) = config
        .install()
        .map_err(|e| CoreError::Transport(e.to_string()))?;
    let queue = Arc::new(RabbitQueue::connect(&config.rabbitmq).await?);
    let state = Arc::new(RedisState::connect(&config.redis.url, &config.redis.prefix).await?);
    // Workers never open the catalog (only the coordinator commits): they are ready when
    // the broker, Redis and the object store answer.
    let readiness = Readiness::new(vec![
        Arc::new(RabbitDependency(queue.clone())),
        Arc::new(RedisDependency(state.clone())),
        Arc::new(ObjectStoreDependency(scratch)),
    ]);
    if let Some(addr) = ops.metrics_listen {
        serve_admin(addr, readiness.clone()).await?;
    }
    // After the recorder is installed (by the admin endpoint), or the series go nowhere.
    nightshift_core::metrics::register_worker();
    let stop_queue = queue.clone();
    let stop_consuming: StopConsuming = Arc::new(move || {
        let queue = stop_queue.clone();
        Box::pin(async move {
            if let Err(e) = queue.stop_consuming_tasks().await {
                tracing::warn!(error = %e, "cannot cancel the task consumer");
            }
        })
    });
    let shutdown = async move {
        terminated().await;
        readiness.start_draining();
    };
    let memory = config.worker_memory();
    let session = new_session(SessionOptions {
        runtime: Some(memory.runtime()?),
        task_memory: Some(memory.per_task()),
        ..SessionOptions::default()
    });
    tracing::info!(
        worker = id,
        memory_limit = %human_bytes(memory.limit),
        spill_dir = ?memory.spill_dir,
        "worker memory"
    );
    Worker::new(id, queue, state)
        .with_session(session)
        .with_lease_ttl(config.redis.lease_ttl())
        .with_drain(ops.drain_grace, stop_consuming)
        .with_lanes(usize::from(config.rabbitmq.prefetch.max(1)))
        .run_until(shutdown)
        .await
}

/// Completes on SIGTERM (Kubernetes scale-down) or Ctrl-C.
pub async fn terminated() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// How often a waiter looks for the job's snapshot in the table, should Redis have lost
/// the outcome.
const CATALOG_READ_EVERY: Duration = Duration::from_secs(5);
/// How long a client that found its job committed in the table's history waits for the
/// coordinator's report (rows, files, checks) before it answers from the history alone.
const REPORT_AFTER_COMMIT: Duration = Duration::from_secs(10);

/// Submits `spec` as job `job_id` and waits for its outcome (the JSON the coordinator
/// stores). Returns that JSON.
pub async fn submit_and_wait(
    config: &ClusterConfig,
    spec: &Path,
    job_id: &JobId,
    params: Vec<(String, String)>,
    timeout: Duration,
) -> Result<serde_json::Value, CoreError> {
    let submission = JobSubmission::from_spec_file(job_id.as_str(), spec, params)
        .map_err(|e| CoreError::io(format!("read {}", spec.display()), e))?;
    let queue = RabbitQueue::connect(&config.rabbitmq).await?;
    let state = RedisState::connect(&config.redis.url, &config.redis.prefix).await?;
    state.clear_report(job_id).await?;
    let payload = serde_json::to_vec(&submission).expect("submission serializes");
    queue.publish_to(&queue.jobs_queue(), &payload).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    // The table as the coordinator resolves it, from what was sent (no second read of the
    // files, no second git call).
    let table =
        nightshift_spec::resolve_submitted(&submission.spec, &submission.files, &submission.params)
            .ok()
            .map(|spec| spec.spec.target.table);
    let started = tokio::time::Instant::now();
    let mut catalog_read_at = started;
    let mut redis_failing = false;
    loop {
        // A Redis that restarts fails a read or two (the client reconnects): the job goes
        // on meanwhile, so the wait does too, and the table's history answers should the
        // outcome be lost with Redis's data.
        match stored_outcome(&state, job_id).await {
            Ok(Some(outcome)) => return Ok(outcome),
            Ok(None) => redis_failing = false,
            Err(CoreError::Transport(e)) => {
                if !redis_failing {
                    tracing::warn!(error = %e, "cannot read the job's outcome from Redis; waiting on");
                }
                redis_failing = true;
            }
            Err(e) => return Err(e),
        }
        // Redis holds the outcome only as a hint: should it be lost (a flushed or replaced
        // Redis), the table's history still tells whether the job committed.
        if catalog_read_at.elapsed() >= CATALOG_READ_EVERY {
            catalog_read_at = tokio::time::Instant::now();
            if let Some(table) = &table
                && let Some(outcome) = committed_outcome(config, table, job_id).await
            {
                // The coordinator stores its report just after the commit: a job seen in
                // the history first has it a moment later, unless Redis lost it.
                let grace = tokio::time::Instant::now() + REPORT_AFTER_COMMIT;
                while tokio::time::Instant::now() < grace {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Ok(Some(outcome)) = stored_outcome(&state, job_id).await {
                        return Ok(outcome);
                    }
                }
                return Ok(outcome);
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CoreError::Transport(format!(
                "job {job_id} did not finish within {}s; it keeps running on the cluster",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(poll_delay(started.elapsed())).await;
    }
}

/// The outcome of `job` the coordinator stored, if it has.
async fn stored_outcome(
    state: &RedisState,
    job: &JobId,
) -> Result<Option<serde_json::Value>, CoreError> {
    match state.report(job).await? {
        Some(report) => serde_json::from_str(&report)
            .map(Some)
            .map_err(|e| CoreError::Protocol(format!("job outcome: {e}"))),
        None => Ok(None),
    }
}

/// The outcome of `job`, read from the table's history, if its snapshot is there.
async fn committed_outcome(
    config: &ClusterConfig,
    table: &str,
    job: &JobId,
) -> Option<serde_json::Value> {
    let (catalog, _) = config.install().ok()?;
    let catalog = nightshift_core::table::open_catalog(&catalog).await.ok()?;
    let ident = nightshift_core::table::parse_table_ident(table).ok()?;
    let loaded = catalog.load_table(&ident).await.ok()?;
    let snapshot_id = nightshift_core::table::find_job_snapshot(&loaded, job)?;
    Some(serde_json::json!({
        "status": "succeeded",
        "job_id": job.to_string(),
        "table": table,
        "snapshot_id": snapshot_id,
        "already_committed": false,
        "note": "the coordinator's stored outcome is gone; the table's history shows the job committed",
    }))
}

/// A dead-lettered task and what Redis knows of its job (state and last error).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    #[serde(flatten)]
    pub task: DeadTask,
    /// `queued`, `running`, `committing`, `succeeded`, `failed`, `cancelled`, or `unknown`.
    pub job_state: String,
    /// The job's last error (its failure message), if it has one.
    pub last_error: String,
}

impl DeadLetter {
    fn job_ended(&self) -> bool {
        nightshift_core::transport::JobState::parse(&self.job_state)
            .is_some_and(|s| s.is_terminal())
    }
}

async fn dlq_connect(config: &ClusterConfig) -> Result<(RabbitQueue, RedisState), CoreError> {
    let queue = RabbitQueue::connect(&config.rabbitmq).await?;
    let state = RedisState::connect(&config.redis.url, &config.redis.prefix).await?;
    Ok((queue, state))
}

async fn with_job_state(state: &RedisState, task: DeadTask) -> DeadLetter {
    use nightshift_core::transport::StateStore;
    let known = match JobId::parse(&task.job_id) {
        Ok(job) => state.job_state(&job).await.ok().flatten(),
        Err(_) => None,
    };
    let (job_state, last_error) = match known {
        Some((s, detail)) => (s.as_str(), detail),
        None => ("unknown", String::new()),
    };
    DeadLetter {
        task,
        job_state: job_state.to_string(),
        last_error,
    }
}

/// Every task in the cluster's dead-letter queue, with its job's state (`nightshift dlq list`).
pub async fn dead_letters(config: &ClusterConfig) -> Result<Vec<DeadLetter>, CoreError> {
    let (queue, state) = dlq_connect(config).await?;
    let mut out = Vec::new();
    for task in queue.dead_tasks().await? {
        out.push(with_job_state(&state, task).await);
    }
    Ok(out)
}

/// What `nightshift dlq replay` or `dlq purge` did.
#[derive(Debug, Default)]
pub struct Settled {
    /// Tasks moved back to the task queue (replay) or removed (purge).
    pub done: Vec<DeadLetter>,
    /// Selected tasks left in the dead-letter queue: by replay, those of jobs that have
    /// ended (workers would skip them; such a job is recovered by running it again under
    /// its job id); by purge, those of jobs not known to have ended.
    pub kept: Vec<DeadLetter>,
}

/// What `dlq` does with the dead letters it was asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqAction {
    Replay,
    Purge,
}

/// The fate of a dead letter of `job_state` (`selected`: its job is the one asked about, or
/// all were): a replay moves back the tasks of jobs still queued or running (or unknown to
/// Redis), never of ended ones; a purge removes only those of ended jobs (succeeded on a
/// rerun, failed, cancelled), which nothing would run any more.
pub fn dead_letter_fate(action: DlqAction, selected: bool, job_ended: bool) -> DeadFate {
    match (action, selected, job_ended) {
        (_, false, _) => DeadFate::Keep,
        (DlqAction::Replay, true, false) => DeadFate::Replay,
        (DlqAction::Purge, true, true) => DeadFate::Remove,
        _ => DeadFate::Keep,
    }
}

/// Replays or purges the dead tasks of `job` (every job with `None`), as
/// [`dead_letter_fate`] decides.
pub async fn settle_dead_letters(
    config: &ClusterConfig,
    job: Option<&str>,
    action: DlqAction,
) -> Result<Settled, CoreError> {
    let (queue, state) = dlq_connect(config).await?;
    let mut letters = Vec::new();
    let settled = queue
        .settle_dead_tasks(|tasks| {
            let tasks = tasks.to_vec();
            let letters = &mut letters;
            let state = &state;
            async move {
                let mut fates = Vec::new();
                for task in tasks {
                    let selected = job.is_none_or(|j| j == task.job_id);
                    let letter = with_job_state(state, task).await;
                    fates.push(dead_letter_fate(action, selected, letter.job_ended()));
                    if selected {
                        letters.push(letter);
                    }
                }
                fates
            }
        })
        .await?;
    let mut outcome = Settled::default();
    for letter in letters {
        if settled.contains(&letter.task) {
            outcome.done.push(letter);
        } else {
            outcome.kept.push(letter);
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_moves_live_jobs_tasks_and_purge_removes_ended_jobs_tasks() {
        use DlqAction::{Purge, Replay};
        assert_eq!(dead_letter_fate(Replay, true, false), DeadFate::Replay);
        assert_eq!(dead_letter_fate(Replay, true, true), DeadFate::Keep);
        assert_eq!(dead_letter_fate(Purge, true, true), DeadFate::Remove);
        assert_eq!(dead_letter_fate(Purge, true, false), DeadFate::Keep);
        for action in [Replay, Purge] {
            for ended in [false, true] {
                assert_eq!(dead_letter_fate(action, false, ended), DeadFate::Keep);
            }
        }
    }
}
