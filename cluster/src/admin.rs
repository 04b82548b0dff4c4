//! The admin endpoint of the coordinator and worker processes (`--metrics-listen`):
//!
//! - `GET /metrics`: every metric of [`nightshift_core::metrics`] in the Prometheus text format;
//! - `GET /healthz`: 200 while the process answers (liveness);
//! - `GET /readyz`: 200 when every dependency answers (RabbitMQ, Redis, object store and,
//!   on the coordinator, the catalog), 503 with the failing ones otherwise, and 503 from the
//!   moment the process starts a graceful stop.
//!
//! Each readiness check has its own time limit, so a dependency that hangs (a broker whose
//! app is stopped still accepts TCP) makes the process unready instead of hanging the probe.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use nightshift_core::error::{CoreError, Result};
use nightshift_core::metrics;
use nightshift_core::storage::Location;
use nightshift_core::table::{CatalogConfig, open_catalog};
use object_store::ObjectStoreExt;
use tracing::{info, warn};

use crate::{RabbitQueue, RedisState};

/// How long one dependency may take to answer a readiness check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder for this process (once; later calls return the same
/// handle) and describes every metric.
pub fn install_metrics() -> Result<PrometheusHandle> {
    if let Some(handle) = PROMETHEUS.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            metrics::DURATION_BUCKETS,
        )
        .and_then(|b| b.install_recorder())
        .map_err(|e| CoreError::Transport(format!("metrics recorder: {e}")))?;
    metrics::describe_all();
    let handle = PROMETHEUS.get_or_init(|| handle).clone();
    // Histograms keep samples until upkeep folds them into buckets.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Something a process needs in order to do its work.
#[async_trait]
pub trait Dependency: Send + Sync {
    /// `rabbitmq`, `redis`, `object_store` or `catalog`.
    fn name(&self) -> &'static str;
    async fn check(&self) -> std::result::Result<(), String>;
}

/// The readiness of one process: its dependencies, and whether it is stopping.
pub struct Readiness {
    dependencies: Vec<Arc<dyn Dependency>>,
    draining: AtomicBool,
}

impl Readiness {
    pub fn new(dependencies: Vec<Arc<dyn Dependency>>) -> Arc<Self> {
        Arc::new(Readiness {
            dependencies,
            draining: AtomicBool::new(false),
        })
    }

    /// From now on the process is not ready: it is stopping (SIGTERM).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Checks every dependency at once; returns whether all answered and one line each.
    pub async fn check(&self) -> (bool, String) {
        let checks = self.dependencies.iter().map(|d| async move {
            let result = match tokio::time::timeout(CHECK_TIMEOUT, d.check()).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            metrics::dependency_checked(d.name(), result.is_ok());
            (d.name(), result)
        });
        let results = futures::future::join_all(checks).await;
        let mut ready = true;
        let mut text = String::new();
        if self.draining.load(Ordering::SeqCst) {
            ready = false;
            text.push_str("draining: stopping gracefully\n");
        }
        for (name, result) in results {
            match result {
                Ok(()) => text.push_str(&format!("{name}: ok\n")),
                Err(e) => {
                    ready = false;
                    text.push_str(&format!("{name}: {e}\n"));
                }
            }
        }
        (ready, text)
    }
}

#[derive(Clone)]
struct AdminState {
    prometheus: PrometheusHandle,
    readiness: Arc<Readiness>,
}

/// Serves the admin endpoint on `addr` (port 0 picks a free port) in the background and
/// returns the address it listens on.
pub async fn serve_admin(addr: SocketAddr, readiness: Arc<Readiness>) -> Result<SocketAddr> {
    serve_admin_with(addr, readiness, Router::new()).await
}

/// [`serve_admin`] with more routes (the coordinator's job report pages).
pub async fn serve_admin_with(
    addr: SocketAddr,
    readiness: Arc<Readiness>,
    more: Router,
) -> Result<SocketAddr> {
    let prometheus = install_metrics()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CoreError::io(format!("admin endpoint on {addr}"), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CoreError::io("admin endpoint address", e))?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AdminState {
            prometheus,
            readiness,
        })
        .merge(more);
    info!(addr = %bound, "admin endpoint listening (/metrics, /healthz, /readyz)");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "admin endpoint stopped");
        }
    });
    Ok(bound)
}

async fn render_metrics(State(state): State<AdminState>) -> String {
    state.prometheus.render()
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, String) {
    let (ready, text) = state.readiness.check().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, text)
}

/// RabbitMQ answers a passive declare of the task queue on this process's connection.
pub struct RabbitDependency(pub Arc<RabbitQueue>);

#[async_trait]
impl Dependency for RabbitDependency {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    async fn check(&self) -> std::result::Result<(), String> {
        self.0
            .queue_stats(&self.0.tasks_queue())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Redis answers `PING`.
pub struct RedisDependency(pub Arc<RedisState>);

#[async_trait]
impl Dependency for RedisDependency {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn check(&self) -> std::result::Result<(), String> {
        self.0.ping().await.map_err(|e| e.to_string())
    }
}

/// The object store of the scratch location answers a `HEAD` (a missing object is an answer).
pub struct ObjectStoreDependency(pub Location);

#[async_trait]
impl Dependency for ObjectStoreDependency {
    fn name(&self) -> &'static str {
        "object_store"
    }

    async fn check(&self) -> std::result::Result<(), String> {
        let (store, key) = self.0.store().map_err(|e| e.to_string())?;
        let probe = key.clone().join(".nightshift-readyz");
        match store.head(&probe).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(format!("object store: {e}")),
        }
    }
}

/// The Iceberg catalog lists its namespaces (opened once, on the first check).
pub struct CatalogDependency {
    config: CatalogConfig,
    catalog: tokio::sync::OnceCell<Arc<dyn iceberg::Catalog>>,
}

impl CatalogDependency {
    pub fn new(config: CatalogConfig) -> Self {
        CatalogDependency {
            config,
            catalog: tokio::sync::OnceCell::new(),
        }
    }
}

#[async_trait]
impl Dependency for CatalogDependency {
    fn name(&self) -> &'static str {
        "catalog"
    }

    async fn check(&self) -> std::result::Result<(), String> {
        let catalog = self
            .catalog
            .get_or_try_init(|| open_catalog(&self.config))
            .await
            .map_err(|e| e.to_string())?;
        catalog
            .list_namespaces(None)
            .await
            .map(|_| ())
            .map_err(|e| format!("catalog: {e}"))
    }
}
