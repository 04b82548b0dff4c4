//! The cluster side of the CLI: the coordinator and worker processes, and
//! `nightshift run --cluster`, which submits a job and waits for its outcome.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nightshift_cluster::admin::{
    ObjectStoreDependency, RabbitDependency, Readiness, RedisDependency, serve_admin,
};
use nightshift_cluster::submission::JobSubmission;
use nightshift_cluster::{ClusterConfig, RabbitQueue, RedisState};
use nightshift_core::CoreError;
use nightshift_core::ids::JobId;
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
    Worker::new(id, queue, state)
        .with_lease_ttl(config.redis.lease_ttl())
        .with_drain(ops.drain_grace, stop_consuming)
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
