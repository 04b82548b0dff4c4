//! Load test of the job API: concurrent clients submitting jobs and polling them against a
//! real coordinator (RabbitMQ, Redis, SQLite catalog) on loopback.
//!
//! For each concurrency level it runs two phases of the same length:
//! 1. `grpc.health.v1.Health/Check` on the same server: the floor of a tonic round trip;
//! 2. `SubmitJob` (spec parsed and checked, idempotency key bound in Redis, job recorded,
//!    submission published to RabbitMQ with a publisher confirm) followed by `GetJob` of it.
//!
//! and prints throughput and p50/p99 of each call, and the ratio of SubmitJob/GetJob to the
//! health check. Everything it creates (a RabbitMQ vhost, Redis keys, a temp dir, the
//! coordinator process) is removed at the end.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nightshift_proto::v1::{GetJobRequest, SubmitJobRequest};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Load test of the Nightshift job API on loopback.
#[derive(Parser, Debug)]
struct Args {
    /// Concurrent clients per level (each has its own connection).
    #[arg(long, value_delimiter = ',', default_values_t = [10, 50, 200])]
    clients: Vec<usize>,
    /// Seconds each phase of each level runs.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Upper bound of calls per phase and level, whatever the time.
    #[arg(long, default_value_t = 20_000)]
    max_calls: usize,
    /// The `nightshift` binary (default: next to this one).
    #[arg(long, env = "NIGHTSHIFT_BIN")]
    nightshift: Option<std::path::PathBuf>,
    /// RabbitMQ management: the test creates and deletes its own vhost with `rabbitmqctl`.
    #[arg(long, default_value = "127.0.0.1:5672")]
    rabbitmq: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
}

/// Latencies of one kind of call, in microseconds (3 significant digits).
struct Latencies(hdrhistogram::Histogram<u64>);

/// Longest latency the histograms hold (µs); a longer call is recorded as this.
const MAX_LATENCY_MICROS: u64 = 600_000_000;

impl Default for Latencies {
    fn default() -> Self {
        // Fixed bounds: `saturating_record` clamps to the current bounds instead of growing
        // an auto-resizing histogram, which would record every call above ~2 ms as ~2 ms.
        Latencies(
            hdrhistogram::Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3)
                .expect("1 µs to 10 min at 3 significant digits is valid"),
        )
    }
}

impl Latencies {
    fn record(&mut self, d: Duration) {
        self.0.saturating_record(d.as_micros() as u64);
    }

    fn calls(&self) -> usize {
        self.0.len() as usize
    }

    fn percentile(&self, p: f64) -> Duration {
        Duration::from_micros(self.0.value_at_quantile(p / 100.0))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A coordinator with its own vhost, Redis prefix and catalog; torn down on drop.
struct Coordinator {
    child: Child,
    vhost: String,
    prefix: String,
    redis: String,
    _dir: tempfile::TempDir,
    url: String,
    token: String,
    spec: String,
}

impl Coordinator {
    fn start(args: &Args) -> Result<Self> {
        let nightshift = match &args.nightshift {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("binary directory")?
                .join("nightshift"),
        };
        let dir = tempfile::tempdir()?;
        let id = format!("nsload{}", std::process::id());
        rabbitmqctl(&["add_vhost", &id])?;
        rabbitmqctl(&["set_permissions", "-p", &id, "guest", ".*", ".*", ".*"])?;
        std::fs::create_dir_all(dir.path().join("data"))?;
        std::fs::write(
            dir.path().join("data/orders.csv"),
            "id,region,amount\n1,eu,10\n2,us,20\n",
        )?;
        let config = dir.path().join("cluster.toml");
        std::fs::write(
            &config,
            format!(
                "[rabbitmq]\nurl = \"amqp://guest:guest@{rabbit}/{id}\"\nprefix = \"{id}\"\n\n\
                 [redis]\nurl = \"{redis}\"\nprefix = \"{id}\"\n\n\
                 [storage]\nscratch = \"{root}/scratch\"\n\n\
                 [catalog]\ntype = \"sql\"\nuri = \"sqlite:{root}/catalog.db?mode=rwc\"\nwarehouse = \"{root}/warehouse\"\n",
                rabbit = args.rabbitmq,
                redis = args.redis,
                root = dir.path().display()
            ),
        )?;
        let spec = format!(
            "[pipeline]\nname = \"load_test\"\n\n[params]\nrun_date = \"2024-01-01\"\n\n\
             [[source]]\nname = \"orders\"\nformat = \"csv\"\nlocation = \"{}/data/orders.csv\"\n\n\
             [transform]\nsql = \"SELECT region, SUM(amount) AS amount FROM orders GROUP BY region\"\n\n\
             [target]\ntable = \"load.by_region\"\n",
            dir.path().display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let token = format!("load-{id}");
        let log = std::fs::File::create(dir.path().join("coordinator.log"))?;
        // One job at a time and no workers: the first job waits for tasks, the rest stay
        // queued, so the coordinator's time goes to the API.
        let child = Command::new(&nightshift)
            .args(["coordinator", "--max-jobs", "1", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--config")
            .arg(&config)
            .env("NIGHTSHIFT_API_TOKENS", &token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", nightshift.display()))?;
        Ok(Coordinator {
            child,
            vhost: id.clone(),
            prefix: id,
            redis: args.redis.clone(),
            _dir: dir,
            url: format!("http://127.0.0.1:{port}"),
            token,
            spec,
        })
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut health) = health_client(&self.url).await
                && health.check(HealthCheckRequest::default()).await.is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the coordinator exited ({status}); see its log");
            }
            if Instant::now() > deadline {
                bail!("the coordinator did not serve within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn remove_redis_keys(&self) -> Result<()> {
        let client = redis::Client::open(self.redis.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut conn)
            .await?;
        for chunk in keys.chunks(500) {
            redis::cmd("DEL")
                .arg(chunk)
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok(())
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = rabbitmqctl(&["delete_vhost", &self.vhost]);
    }
}

async fn health_client(url: &str) -> Result<HealthClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Channel::from_shared(url.to_string())?
        .connect()
        .await?;
    Ok(HealthClient::new(channel))
}

fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .context("rabbitmqctl on PATH")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Results of one phase.
struct Phase {
    calls: usize,
    elapsed: Duration,
    latencies: Vec<Latencies>,
}

/// Runs `clients` loops of `round` (which returns the latency of each call it makes) until
/// `seconds` pass or `max_calls` rounds are done.
async fn phase<C, F, Fut>(
    clients: Vec<C>,
    seconds: u64,
    max_calls: usize,
    kinds: usize,
    round: F,
) -> Result<Phase>
where
    C: Send + 'static,
    F: Fn(C, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(C, Vec<Duration>)>> + Send,
{
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let budget = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(max_calls));
    let mut handles = Vec::new();
    for client in clients {
        let round = round.clone();
        let budget = budget.clone();
        handles.push(tokio::spawn(async move {
            let mut client = client;
            let mut mine: Vec<Vec<Duration>> = vec![Vec::new(); kinds];
            let mut n = 0;
            while Instant::now() < deadline
                && budget
                    .fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |b| b.checked_sub(1),
                    )
                    .is_ok()
            {
                let (c, times) = round(client, n).await?;
                client = c;
                for (kind, t) in times.into_iter().enumerate() {
                    mine[kind].push(t);
                }
                n += 1;
            }
            anyhow::Ok(mine)
        }));
    }
    let mut latencies: Vec<Latencies> = (0..kinds).map(|_| Latencies::default()).collect();
    for handle in handles {
        for (kind, times) in handle.await??.into_iter().enumerate() {
            for t in times {
                latencies[kind].record(t);
            }
        }
    }
    Ok(Phase {
        calls: latencies[0].calls(),
        elapsed: started.elapsed(),
        latencies,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut coordinator = Coordinator::start(&args)?;
    coordinator.wait_ready().await?;
    println!(
        "job API load test: coordinator on {} (RabbitMQ {}, {}), {} s per phase, at most {} calls",
        coordinator.url, args.rabbitmq, args.redis, args.seconds, args.max_calls
    );
    println!(
        "\n{:>7} | {:>9} {:>8} {:>8} | {:>9} {:>8} {:>8} {:>8} {:>8} | {:>6}",
        "clients",
        "health/s",
        "p50 ms",
        "p99 ms",
        "rounds/s",
        "sub p50",
        "sub p99",
        "get p50",
        "get p99",
        "x hc"
    );
    let run_id = std::process::id();
    for &clients in &args.clients {
        let mut health = Vec::new();
        let mut api = Vec::new();
        for _ in 0..clients {
            health.push(health_client(&coordinator.url).await?);
            api.push(
                nightshift::client::connect(&coordinator.url, Some(coordinator.token.clone()))
                    .await
                    .map_err(anyhow::Error::msg)?,
            );
        }
        let baseline = phase(
            health,
            args.seconds,
            args.max_calls,
            1,
            |mut c, _| async move {
                let t = Instant::now();
                c.check(HealthCheckRequest::default()).await?;
                Ok((c, vec![t.elapsed()]))
            },
        )
        .await?;
        let spec = coordinator.spec.clone();
        let api = api.into_iter().enumerate().collect::<Vec<_>>();
        let rounds = phase(
            api,
            args.seconds,
            args.max_calls,
            2,
            move |(i, mut c), n| {
                let request = SubmitJobRequest {
                    spec: spec.clone(),
                    idempotency_key: format!("load-{run_id}-{clients}-{i}-{n}"),
                    ..Default::default()
                };
                async move {
                    let t = Instant::now();
                    let job = c.submit_job(request).await?.into_inner();
                    let submit = t.elapsed();
                    let t = Instant::now();
                    c.get_job(GetJobRequest { job_id: job.job_id }).await?;
                    Ok(((i, c), vec![submit, t.elapsed()]))
                }
            },
        )
        .await?;
        let hc = baseline.latencies.into_iter().next().expect("one kind");
        let hc_p50 = hc.percentile(50.0);
        let (submit_p50, submit_p99) = (
            rounds.latencies[0].percentile(50.0),
            rounds.latencies[0].percentile(99.0),
        );
        let (get_p50, get_p99) = (
            rounds.latencies[1].percentile(50.0),
            rounds.latencies[1].percentile(99.0),
        );
        println!(
            "{:>7} | {:>9.0} {:>8.2} {:>8.2} | {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} | {:>6.1}",
            clients,
            baseline.calls as f64 / baseline.elapsed.as_secs_f64(),
            ms(hc_p50),
            ms(hc.percentile(99.0)),
            rounds.calls as f64 / rounds.elapsed.as_secs_f64(),
            ms(submit_p50),
            ms(submit_p99),
            ms(get_p50),
            ms(get_p99),
            ms(submit_p50) / ms(hc_p50).max(1e-6),
        );
    }
    println!(
        "\nrounds/s: SubmitJob + GetJob pairs per second; x hc: SubmitJob p50 / health-check p50."
    );
    coordinator.remove_redis_keys().await?;
    Ok(())
}
