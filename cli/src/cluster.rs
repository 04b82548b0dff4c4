//! The cluster side of the CLI: the coordinator and worker processes, and
//! `nightshift run --cluster`, which submits a job and waits for its outcome.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nightshift_cluster::submission::JobSubmission;
use nightshift_cluster::{ClusterConfig, RabbitQueue, RedisState};
use nightshift_core::CoreError;
use nightshift_core::ids::JobId;
use nightshift_core::session::{SessionOptions, human_bytes, new_session};
use nightshift_worker::Worker;

/// Runs a worker until its queue closes or the broker goes away.
pub async fn run_worker(config: &ClusterConfig, id: &str) -> Result<(), CoreError> {
    config
        .install()
        .map_err(|e| CoreError::Transport(e.to_string()))?;
    let queue = Arc::new(RabbitQueue::connect(&config.rabbitmq).await?);
    let state = Arc::new(RedisState::connect(&config.redis.url, &config.redis.prefix).await?);
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
        .run_until(terminated())
        .await
}

/// Completes on SIGTERM (Kubernetes scale-down) or Ctrl-C.
async fn terminated() {
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
    loop {
        if let Some(report) = state.report(job_id).await? {
            return serde_json::from_str(&report)
                .map_err(|e| CoreError::Protocol(format!("job outcome: {e}")));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CoreError::Transport(format!(
                "job {job_id} did not finish within {}s; it keeps running on the cluster",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
