//! The cluster configuration: a TOML file with `NIGHTSHIFT_*` environment overrides.
//! Secrets (S3 keys, catalog credentials) come from the environment only and are never
//! logged: `Debug` prints them redacted.

use std::collections::HashMap;
use std::path::Path;

use nightshift_core::access::AccessPolicy;
use nightshift_core::session::{MemorySettings, parse_bytes};
use nightshift_core::storage::{Location, S3Settings, configure_s3, set_iceberg_props};
use nightshift_core::table::{CatalogConfig, Secret};
use serde::Deserialize;

/// An error in the cluster configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

/// `nightshift-cluster.toml`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub rabbitmq: RabbitSection,
    pub redis: RedisSection,
    pub storage: StorageSection,
    pub catalog: CatalogSection,
    #[serde(default)]
    pub access: AccessSection,
    #[serde(default)]
    pub worker: WorkerSection,
}

/// `[worker]`: how a worker runs its tasks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    /// Memory the worker's running tasks may hold in operators, e.g. `"6GiB"`
    /// (`NIGHTSHIFT_MEMORY_LIMIT`). Operators spill to `spill_dir` past it; a task that still
    /// does not fit fails, naming the operator and the limit. Default: 60 % of the
    /// container's (cgroup) or machine's memory. The coordinator plans joins for it too.
    #[serde(default)]
    pub memory_limit: Option<String>,
    /// Local directory for spill files (`NIGHTSHIFT_SPILL_DIR`); default: the system's
    /// temporary directory.
    #[serde(default)]
    pub spill_dir: Option<String>,
}

/// `[access]`: what submitted pipelines may touch. Empty lists allow everything, which suits
/// a cluster whose every submitter is trusted; set both for a shared coordinator.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSection {
    /// Location prefixes sources may read, e.g. `["s3://lake/raw/"]`
    /// (`NIGHTSHIFT_ALLOWED_LOCATIONS`, comma-separated).
    #[serde(default)]
    pub locations: Vec<String>,
    /// Iceberg tables jobs may read and write: `ns.table` or `ns.*`
    /// (`NIGHTSHIFT_ALLOWED_TABLES`, comma-separated).
    #[serde(default)]
    pub tables: Vec<String>,
}

impl AccessSection {
    pub fn policy(&self) -> Result<AccessPolicy, ConfigError> {
        AccessPolicy::new(&self.locations, &self.tables)
            .map_err(|e| ConfigError::Invalid(format!("[access] {e}")))
    }
}

/// `[rabbitmq]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSection {
    /// AMQP URL (`NIGHTSHIFT_RABBITMQ_URL`).
    #[serde(default = "default_amqp_url")]
    pub url: String,
    /// Prefix of every queue and exchange name, so clusters can share a broker.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Tasks a worker holds and runs at once (`NIGHTSHIFT_RABBITMQ_PREFETCH`), sharing its
    /// memory limit. 1 suits heavy tasks; a few more keep a worker busy on small ones, whose
    /// time goes mostly to broker round trips.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Deliveries of one task message before it is dead-lettered (a worker that crashes on
    /// it every time).
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// Redis URL (`NIGHTSHIFT_REDIS_URL`).
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// Prefix of every key.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Task lease in seconds: workers renew it every third; a task whose lease expires is run
    /// again elsewhere (a frozen or partitioned worker). Default 30.
    #[serde(default)]
    pub lease_secs: Option<u64>,
}

impl RedisSection {
    pub fn lease_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_secs.unwrap_or(30).max(1))
    }
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// Where job scratch (shuffle) objects go, e.g. `s3://bucket/_nightshift`.
    pub scratch: String,
    /// S3 endpoint for S3-compatible stores (`NIGHTSHIFT_S3_ENDPOINT`); unset for AWS.
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    #[serde(default)]
    pub s3_region: Option<String>,
    /// Path-style requests (`http://host/bucket/key`), needed by most S3-compatible stores.
    #[serde(default)]
    pub s3_path_style: bool,
    /// Scratch of a job that is not running and untouched for this many hours is deleted by
    /// the coordinator's sweeper (default 24).
    #[serde(default)]
    pub scratch_ttl_hours: Option<u64>,
    /// Seconds after a job ends when its unreferenced data files and scratch are swept once
    /// more, for task attempts that were still writing when it ended (default 15).
    #[serde(default)]
    pub late_sweep_secs: Option<u64>,
}

impl StorageSection {
    pub fn scratch_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.scratch_ttl_hours.unwrap_or(24) * 3600)
    }

    pub fn late_sweep_after(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.late_sweep_secs.unwrap_or(15).max(1))
    }
}

/// `[catalog]`. A REST catalog's OAuth2 client credentials (`client_id:client_secret`) come
/// from `NIGHTSHIFT_CATALOG_CREDENTIAL`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSection {
    /// `rest` or `sql`.
    #[serde(rename = "type")]
    pub kind: String,
    /// REST base URI, or SQL URL (`postgres://…`, `sqlite:…`) (`NIGHTSHIFT_CATALOG_URI`).
    pub uri: String,
    /// Warehouse location (`s3://bucket/warehouse`) or REST warehouse name.
    pub warehouse: String,
    #[serde(default = "default_catalog_name")]
    pub name: String,
}

fn default_amqp_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".into()
}
fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".into()
}
fn default_prefix() -> String {
    "nightshift".into()
}
fn default_prefetch() -> u16 {
    1
}
fn default_delivery_limit() -> u32 {
    5
}
fn default_catalog_name() -> String {
    "nightshift".into()
}

impl ClusterConfig {
    /// Reads `path` and applies environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config: ClusterConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.message().to_string(),
        })?;
        config.apply_env(|k| std::env::var(k).ok());
        config.validate()?;
        Ok(config)
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(v) = get("NIGHTSHIFT_RABBITMQ_URL") {
            self.rabbitmq.url = v;
        }
        if let Some(v) = get("NIGHTSHIFT_RABBITMQ_PREFETCH").and_then(|v| v.trim().parse().ok()) {
            self.rabbitmq.prefetch = v;
        }
        if let Some(v) = get("NIGHTSHIFT_REDIS_URL") {
            self.redis.url = v;
        }
        if let Some(v) = get("NIGHTSHIFT_S3_ENDPOINT") {
            self.storage.s3_endpoint = Some(v);
        }
        if let Some(v) = get("NIGHTSHIFT_CATALOG_URI") {
            self.catalog.uri = v;
        }
        let list = |v: String| -> Vec<String> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        if let Some(v) = get("NIGHTSHIFT_ALLOWED_LOCATIONS") {
            self.access.locations = list(v);
        }
        if let Some(v) = get("NIGHTSHIFT_ALLOWED_TABLES") {
            self.access.tables = list(v);
        }
        if let Some(v) = get("NIGHTSHIFT_MEMORY_LIMIT") {
            self.worker.memory_limit = Some(v);
        }
        if let Some(v) = get("NIGHTSHIFT_SPILL_DIR") {
            self.worker.spill_dir = Some(v);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(limit) = &self.worker.memory_limit {
            parse_bytes(limit)
                .map_err(|e| ConfigError::Invalid(format!("[worker] memory_limit: {e}")))?;
        }
        Ok(())
    }

    /// The memory settings of a worker of this cluster: its limit is shared by the tasks it
    /// holds at once (the RabbitMQ prefetch).
    pub fn worker_memory(&self) -> MemorySettings {
        MemorySettings::new(
            self.worker
                .memory_limit
                .as_deref()
                .and_then(|v| parse_bytes(v).ok()),
            self.worker.spill_dir.as_ref().map(std::path::PathBuf::from),
            usize::from(self.rabbitmq.prefetch.max(1)),
        )
    }

    /// Configures this process's object stores and Iceberg FileIO, and returns the catalog
    /// and scratch settings.
    pub fn install(&self) -> Result<(CatalogConfig, Location), ConfigError> {
        let allow_http = self
            .storage
            .s3_endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        configure_s3(S3Settings {
            endpoint: self.storage.s3_endpoint.clone(),
            region: self.storage.s3_region.clone(),
            path_style: self.storage.s3_path_style,
            allow_http,
        });
        let mut props = HashMap::new();
        if let Some(endpoint) = &self.storage.s3_endpoint {
            props.insert("s3.endpoint".to_string(), endpoint.clone());
        }
        if let Some(region) = &self.storage.s3_region {
            props.insert("s3.region".to_string(), region.clone());
        }
        props.insert(
            "s3.path-style-access".to_string(),
            self.storage.s3_path_style.to_string(),
        );
        for (env, prop) in [
            ("AWS_ACCESS_KEY_ID", "s3.access-key-id"),
            ("AWS_SECRET_ACCESS_KEY", "s3.secret-access-key"),
            ("AWS_SESSION_TOKEN", "s3.session-token"),
        ] {
            if let Ok(v) = std::env::var(env) {
                props.insert(prop.to_string(), v);
            }
        }
        set_iceberg_props(props);
        // Admission checks sources against [access] locations; every read of a local file
        // inside one then opens beneath it, in the coordinator and in each worker.
        nightshift_core::access::confine_local_reads(self.access.policy()?.local_roots());
        let scratch = Location::parse(&self.storage.scratch, Path::new("/"))
            .map_err(|e| ConfigError::Invalid(format!("[storage] scratch: {e}")))?;
        let catalog = match self.catalog.kind.as_str() {
            "rest" => CatalogConfig::Rest {
                name: self.catalog.name.clone(),
                uri: self.catalog.uri.clone(),
                warehouse: self.catalog.warehouse.clone(),
                credential: std::env::var("NIGHTSHIFT_CATALOG_CREDENTIAL")
                    .ok()
                    .map(Secret),
            },
            "sql" => CatalogConfig::Sql {
                name: self.catalog.name.clone(),
                uri: self.catalog.uri.clone(),
                warehouse: Location::parse(&self.catalog.warehouse, Path::new("/"))
                    .map_err(|e| ConfigError::Invalid(format!("[catalog] warehouse: {e}")))?,
            },
            other => {
                return Err(ConfigError::Invalid(format!(
                    "[catalog] type = \"{other}\": expected \"rest\" or \"sql\""
                )));
            }
        };
        Ok((catalog, scratch))
    }
}

/// `url` with the password of its user info replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparsable url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_values() {
        let mut config: ClusterConfig = toml::from_str(
            r#"
[rabbitmq]
[redis]
[storage]
scratch = "s3://b/_ns"
[catalog]
type = "rest"
uri = "http://127.0.0.1:8181"
warehouse = "s3://b/wh"
"#,
        )
        .unwrap();
        assert_eq!(config.rabbitmq.prefetch, 1);
        config.apply_env(|k| (k == "NIGHTSHIFT_REDIS_URL").then(|| "redis://other:1".to_string()));
        assert_eq!(config.redis.url, "redis://other:1");
        config.apply_env(|k| (k == "NIGHTSHIFT_RABBITMQ_PREFETCH").then(|| " 4".to_string()));
        assert_eq!(config.rabbitmq.prefetch, 4);
        assert_eq!(
            config.worker_memory().per_task(),
            config.worker_memory().limit / 4
        );
    }

    #[test]
    fn worker_memory_comes_from_the_file_or_the_environment() {
        let mut config: ClusterConfig = toml::from_str(
            r#"
[rabbitmq]
prefetch = 2
[redis]
[storage]
scratch = "/tmp/s"
[catalog]
type = "sql"
uri = "sqlite::memory:"
warehouse = "/tmp/w"
[worker]
memory_limit = "3GiB"
"#,
        )
        .unwrap();
        assert_eq!(config.worker_memory().limit, 3 << 30);
        assert_eq!(config.worker_memory().per_task(), 3 << 29);
        config.apply_env(|k| (k == "NIGHTSHIFT_MEMORY_LIMIT").then(|| "lots".to_string()));
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("[worker] memory_limit"), "{err}");
    }

    #[test]
    fn urls_are_logged_without_their_password() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@broker:5672/%2f"),
            "amqp://guest:***@broker:5672/%2f"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert!(!redact_url("redis://:hunter2@r:6379").contains("hunter2"));
    }
}
