//! Autoscaling under load, on loopback: a burst of jobs on a real coordinator, real RabbitMQ
//! and Redis, with worker processes started and stopped (SIGTERM) by a scaler that applies
//! the rule of the KEDA trigger in `deploy/base/keda.yaml`:
//!
//! - queue length = ready task messages + tasks running (KEDA's `QueueLength` with the
//!   management API, unacked messages included); running tasks are read from the workers'
//!   `nightshift_tasks_running`;
//! - desired workers = ceil(queue length / target per worker), within [min, max]; while the
//!   queue length is 0 the desired count is `min` (0: scale to zero);
//! - scale up at once; scale down to the highest desired count of the last `cool-down`
//!   seconds (the HPA's scale-down stabilization window), stopping the newest workers.
//!
//! It records workers, queue length and tasks done over time (`timeline.csv`), draws them
//! (`chart.svg`), and checks that every job committed exactly one snapshot holding the rows
//! DataFusion computes for that job's parameters, and that every stopped worker exited 0.
//! Bounded by `--max-secs`; everything it creates (vhost, Redis keys, processes, temp dir)
//! is removed at the end.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use nightshift_cluster::config::RabbitSection;
use nightshift_cluster::submission::JobSubmission;
use nightshift_cluster::{RabbitQueue, RedisState};
use nightshift_core::ids::JobId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Autoscaling run: burst of jobs, workers scaled on the task queue.
#[derive(Parser, Debug)]
struct Args {
    /// Jobs in all (each a year of TPC-H orders, so their results differ).
    #[arg(long, default_value_t = 14)]
    jobs: usize,
    /// The jobs come in this many bursts, `--wave-gap-secs` apart, so the workers scale
    /// down while the first burst's last tasks run and up again for the next.
    #[arg(long, default_value_t = 2)]
    waves: usize,
    #[arg(long, default_value_t = 120)]
    wave_gap_secs: u64,
    /// Target task messages per worker (the KEDA trigger's `value`).
    #[arg(long, default_value_t = 8)]
    target: u32,
    #[arg(long, default_value_t = 0)]
    min_workers: usize,
    #[arg(long, default_value_t = 6)]
    max_workers: usize,
    /// Scale-down stabilization (and scale-to-zero cool-down), seconds.
    #[arg(long, default_value_t = 15)]
    cooldown_secs: u64,
    /// Seconds between two looks at the queue (KEDA's pollingInterval).
    #[arg(long, default_value_t = 1.0)]
    poll_secs: f64,
    /// The whole run ends after this long, finished or not.
    #[arg(long, default_value_t = 600)]
    max_secs: u64,
    /// TPC-H scale factor of the input.
    #[arg(long, default_value_t = 0.2)]
    scale: f64,
    /// Tasks per stage.
    #[arg(long, default_value_t = 8)]
    partitions: usize,
    /// Where timeline.csv and chart.svg go.
    #[arg(long, default_value = "load-tests/autoscale")]
    out: PathBuf,
    /// The `nightshift` binary (default: next to this one).
    #[arg(long, env = "NIGHTSHIFT_BIN")]
    nightshift: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:5672")]
    rabbitmq: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
}

const SQL: &str = "SELECT o.o_orderdate AS order_date, l.l_returnflag AS flag, COUNT(*) AS items, \
    SUM(l.l_extendedprice) AS revenue FROM orders o JOIN lineitem l ON l.l_orderkey = o.o_orderkey \
    WHERE o.o_orderdate >= DATE '${start}' AND o.o_orderdate < DATE '${end}' \
    GROUP BY o.o_orderdate, l.l_returnflag";

/// One look at the cluster.
#[derive(Debug, Clone)]
struct Sample {
    t: f64,
    workers: usize,
    desired: usize,
    ready: u32,
    running: u32,
    tasks_done: u64,
    jobs_done: usize,
}

/// A worker process the scaler started.
struct WorkerProc {
    name: String,
    child: Child,
    log: PathBuf,
    admin: Option<String>,
}

/// How a worker the scaler stopped ended.
#[derive(Debug)]
struct Stopped {
    name: String,
    exit: Option<i32>,
    drain: &'static str,
}

struct Run {
    args: Args,
    nightshift: PathBuf,
    dir: tempfile::TempDir,
    id: String,
    config: PathBuf,
    coordinator: Option<Child>,
    coordinator_admin: String,
    workers: Vec<WorkerProc>,
    stopping: Vec<(WorkerProc, Instant)>,
    stopped: Vec<Stopped>,
    started: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let nightshift = match &args.nightshift {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("nightshift"),
    };
    let mut run = Run::prepare(args, nightshift)?;
    let outcome = run.execute().await;
    run.teardown();
    outcome
}

impl Run {
    fn prepare(args: Args, nightshift: PathBuf) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let id = format!("nsscale{}", std::process::id());
        rabbitmqctl(&["add_vhost", &id])?;
        rabbitmqctl(&["set_permissions", "-p", &id, "guest", ".*", ".*", ".*"])?;
        let root = dir.path();
        let status = Command::new(&nightshift)
            .arg("example-data")
            .arg(root.join("data"))
            .args(["--scale", &args.scale.to_string(), "--parts", "8"])
            .stdout(Stdio::null())
            .status()?;
        ensure!(status.success(), "example-data failed");
        let config = root.join("cluster.toml");
        std::fs::write(
            &config,
            format!(
                "[rabbitmq]\nurl = \"amqp://guest:guest@{rabbit}/{id}\"\nprefix = \"{id}\"\n\n\
                 [redis]\nurl = \"{redis}\"\nprefix = \"{id}\"\n\n\
                 [storage]\nscratch = \"{root}/scratch\"\n\n\
                 [catalog]\ntype = \"sql\"\nuri = \"sqlite:{root}/catalog.db?mode=rwc\"\nwarehouse = \"{root}/warehouse\"\n",
                rabbit = args.rabbitmq,
                redis = args.redis,
                root = root.display()
            ),
        )?;
        std::fs::write(
            root.join("pipeline.toml"),
            format!(
                "[pipeline]\nname = \"autoscale\"\n\n[params]\nstart = \"1992-01-01\"\nend = \"1993-01-01\"\n\n\
                 [[source]]\nname = \"orders\"\nformat = \"parquet\"\nlocation = \"{root}/data/orders/\"\n\n\
                 [[source]]\nname = \"lineitem\"\nformat = \"csv\"\nlocation = \"{root}/data/lineitem/*.csv\"\noptions = {{ header = \"true\" }}\n\
                 [source.schema]\nl_orderkey = \"bigint not null\"\nl_extendedprice = \"decimal(15, 2) not null\"\n\n\
                 [transform]\nsql = \"{SQL}\"\n\n[target]\ntable = \"bench.autoscale\"\n\n\
                 [execution]\nshuffle_partitions = {p}\nbroadcast_join_threshold_bytes = 0\n",
                root = root.display(),
                p = args.partitions
            ),
        )?;
        Ok(Run {
            args,
            nightshift,
            dir,
            id,
            config,
            coordinator: None,
            coordinator_admin: String::new(),
            workers: Vec::new(),
            stopping: Vec::new(),
            stopped: Vec::new(),
            started: 0,
        })
    }

    fn spawn(&self, args: &[&str], log: &Path) -> Result<Child> {
        Ok(Command::new(&self.nightshift)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("NIGHTSHIFT_METRICS_LISTEN", "127.0.0.1:0")
            .env("NIGHTSHIFT_DRAIN_GRACE_SECS", "10")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?)
    }

    async fn execute(&mut self) -> Result<()> {
        let log = self.dir.path().join("coordinator.log");
        let max_jobs = self.args.jobs.to_string();
        self.coordinator = Some(self.spawn(&["coordinator", "--max-jobs", &max_jobs], &log)?);
        self.coordinator_admin = wait_for_admin(&log, Duration::from_secs(60))
            .await
            .context("coordinator admin endpoint")?;
        let queue = Arc::new(
            RabbitQueue::connect(&RabbitSection {
                url: format!("amqp://guest:guest@{}/{}", self.args.rabbitmq, self.id),
                prefix: self.id.clone(),
                prefetch: 1,
                delivery_limit: 5,
            })
            .await?,
        );
        let state = RedisState::connect(&self.args.redis, &self.id).await?;

        let years: Vec<i32> = (0..self.args.jobs).map(|i| 1992 + (i % 7) as i32).collect();
        let jobs: Vec<(String, i32)> = years
            .iter()
            .enumerate()
            .map(|(i, year)| (format!("autoscale-{}-{i:02}", self.id), *year))
            .collect();
        let waves = self.args.waves.clamp(1, jobs.len().max(1));
        let per_wave = jobs.len().div_ceil(waves);
        let mut pending: VecDeque<&[(String, i32)]> = jobs.chunks(per_wave).collect();
        let spec = self.dir.path().join("pipeline.toml");
        let mut next_wave = Instant::now();
        println!(
            "{} jobs in {} wave(s) {} s apart; scaling workers {}..{} at {} task(s) per worker, cool-down {} s",
            jobs.len(),
            pending.len(),
            self.args.wave_gap_secs,
            self.args.min_workers,
            self.args.max_workers,
            self.args.target,
            self.args.cooldown_secs
        );

        let start = Instant::now();
        let cooldown = Duration::from_secs(self.args.cooldown_secs);
        let mut history: VecDeque<(Instant, usize)> = VecDeque::new();
        let mut samples = Vec::new();
        let mut outcomes: HashMap<String, serde_json::Value> = HashMap::new();
        let mut peak_ready = 0;
        loop {
            let now = Instant::now();
            ensure!(
                now.duration_since(start) < Duration::from_secs(self.args.max_secs),
                "not done within {} s",
                self.args.max_secs
            );
            if Instant::now() >= next_wave
                && let Some(wave) = pending.pop_front()
            {
                for (job, year) in wave {
                    let params = vec![
                        ("start".to_string(), format!("{year}-01-01")),
                        ("end".to_string(), format!("{}-01-01", year + 1)),
                    ];
                    let submission = JobSubmission::from_spec_file(job, &spec, params)?;
                    queue
                        .publish_to(&queue.jobs_queue(), &serde_json::to_vec(&submission)?)
                        .await?;
                }
                println!(
                    "{:>5.1} s: submitted {} job(s)",
                    start.elapsed().as_secs_f64(),
                    wave.len()
                );
                next_wave = Instant::now() + Duration::from_secs(self.args.wave_gap_secs);
            }
            self.reap_stopping();
            for (job, _) in &jobs {
                if !outcomes.contains_key(job)
                    && let Some(report) = state
                        .report(&JobId::parse(job).map_err(anyhow::Error::msg)?)
                        .await?
                {
                    outcomes.insert(job.clone(), serde_json::from_str(&report)?);
                }
            }
            let (ready, _) = queue.queue_stats(&queue.tasks_queue()).await?;
            let running = self.running_tasks().await;
            let length = ready + running;
            peak_ready = peak_ready.max(ready);
            let desired = if length == 0 {
                self.args.min_workers
            } else {
                (length.div_ceil(self.args.target) as usize)
                    .clamp(self.args.min_workers.max(1), self.args.max_workers)
            };
            history.push_back((now, desired));
            while history
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > cooldown)
            {
                history.pop_front();
            }
            let stabilized = history.iter().map(|(_, d)| *d).max().unwrap_or(desired);
            let current = self.workers.len();
            if desired > current {
                for _ in current..desired {
                    self.start_worker()?;
                }
            } else if stabilized < current {
                for _ in stabilized..current {
                    self.stop_newest_worker();
                }
            }
            let tasks_done = scrape(&self.coordinator_admin)
                .await
                .map(|m| metric(&m, "nightshift_tasks_completed_total") as u64)
                .unwrap_or(0);
            let sample = Sample {
                t: start.elapsed().as_secs_f64(),
                workers: self.workers.len(),
                desired,
                ready,
                running,
                tasks_done,
                jobs_done: outcomes.len(),
            };
            samples.push(sample.clone());
            let all_done = outcomes.len() == jobs.len() && pending.is_empty();
            if all_done && self.workers.len() == self.args.min_workers && self.stopping.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_secs_f64(self.args.poll_secs)).await;
        }
        let elapsed = start.elapsed();

        std::fs::create_dir_all(&self.args.out)?;
        write_timeline(&self.args.out.join("timeline.csv"), &samples)?;
        std::fs::write(self.args.out.join("chart.svg"), chart(&samples, &self.args))?;

        // Exactly once, with the right rows.
        let expected = expected_rows(self.dir.path(), &years).await?;
        let committed = committed_snapshots(self.dir.path()).await?;
        let mut problems = Vec::new();
        for (job, year) in &jobs {
            let outcome = &outcomes[job];
            if outcome["status"] != "succeeded" {
                problems.push(format!("{job}: {outcome}"));
                continue;
            }
            let want = expected[year];
            match committed.get(job).map(Vec::as_slice) {
                Some([rows]) if *rows == want => {}
                other => problems.push(format!(
                    "{job} ({year}): snapshots {other:?}, expected one of {want} rows"
                )),
            }
        }
        let bad_exits: Vec<&Stopped> = self.stopped.iter().filter(|s| s.exit != Some(0)).collect();
        let drains = |what: &str| self.stopped.iter().filter(|s| s.drain == what).count();
        let peak_workers = samples.iter().map(|s| s.workers).max().unwrap_or(0);
        let tasks_done = samples.last().map_or(0, |s| s.tasks_done);
        println!(
            "done in {:.0} s: {} jobs, {} tasks; workers peaked at {}, {} started, {} stopped \
             ({} finished their task, {} handed it back, {} idle), peak ready messages {}",
            elapsed.as_secs_f64(),
            jobs.len(),
            tasks_done,
            peak_workers,
            self.started,
            self.stopped.len(),
            drains("finished"),
            drains("requeued"),
            drains("idle"),
            peak_ready
        );
        let each: Vec<String> = self
            .stopped
            .iter()
            .map(|s| format!("{} {} (exit {:?})", s.name, s.drain, s.exit))
            .collect();
        println!("stopped workers: {}", each.join(", "));
        let total: u64 = jobs.iter().map(|(_, y)| expected[y]).sum();
        println!(
            "table bench.autoscale: {} snapshots, {} rows (expected {total})",
            committed.values().map(Vec::len).sum::<usize>(),
            committed.values().flatten().sum::<u64>()
        );
        println!(
            "timeline: {}, chart: {}",
            self.args.out.join("timeline.csv").display(),
            self.args.out.join("chart.svg").display()
        );
        if !bad_exits.is_empty() {
            problems.push(format!("workers that did not exit 0: {bad_exits:?}"));
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("\n"));
        }
        println!(
            "every job committed exactly once with the right rows; every stopped worker exited 0"
        );
        Ok(())
    }

    fn start_worker(&mut self) -> Result<()> {
        let name = format!("w{:02}", self.started);
        self.started += 1;
        let log = self.dir.path().join(format!("{name}.log"));
        let child = self.spawn(&["worker", "--id", &name], &log)?;
        self.workers.push(WorkerProc {
            name,
            child,
            log,
            admin: None,
        });
        Ok(())
    }

    /// SIGTERM to the newest worker; it drains in the background.
    fn stop_newest_worker(&mut self) {
        if let Some(worker) = self.workers.pop() {
            let _ = Command::new("kill")
                .args(["-TERM", &worker.child.id().to_string()])
                .status();
            self.stopping.push((worker, Instant::now()));
        }
    }

    /// Collects the workers that finished draining.
    fn reap_stopping(&mut self) {
        let mut still = Vec::new();
        for (mut worker, since) in std::mem::take(&mut self.stopping) {
            match worker.child.try_wait() {
                Ok(Some(status)) => {
                    let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
                    let drain = if log.contains("task handed back to the queue") {
                        "requeued"
                    } else if log.contains("running task finished and acked") {
                        "finished"
                    } else {
                        "idle"
                    };
                    self.stopped.push(Stopped {
                        name: worker.name,
                        exit: status.code(),
                        drain,
                    });
                }
                _ if since.elapsed() > Duration::from_secs(60) => {
                    let _ = worker.child.kill();
                    let _ = worker.child.wait();
                    self.stopped.push(Stopped {
                        name: worker.name,
                        exit: None,
                        drain: "killed after 60 s",
                    });
                }
                _ => still.push((worker, since)),
            }
        }
        self.stopping = still;
    }

    /// Tasks running on live workers, from their metrics.
    async fn running_tasks(&mut self) -> u32 {
        let mut running = 0.0;
        for worker in &mut self.workers {
            if worker.admin.is_none() {
                worker.admin = admin_in_log(&worker.log);
            }
            if let Some(addr) = &worker.admin
                && let Ok(text) = scrape(addr).await
            {
                running += metric(&text, "nightshift_tasks_running");
            }
        }
        running as u32
    }

    fn teardown(&mut self) {
        for worker in self
            .workers
            .iter_mut()
            .chain(self.stopping.iter_mut().map(|(w, _)| w))
        {
            let _ = worker.child.kill();
            let _ = worker.child.wait();
        }
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = rabbitmqctl(&["delete_vhost", &self.id]);
        if let Ok(client) = redis::Client::open(self.args.redis.as_str())
            && let Ok(mut conn) = client.get_connection()
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.id))
                .query(&mut conn)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
            }
        }
    }
}

fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let out = Command::new("rabbitmqctl").args(args).output()?;
    ensure!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn admin_in_log(log: &Path) -> Option<String> {
    std::fs::read_to_string(log)
        .ok()?
        .lines()
        .filter(|l| l.contains("admin endpoint listening"))
        .find_map(|l| l.split("addr=").nth(1))
        .map(|a| a.split_whitespace().next().unwrap_or_default().to_string())
}

async fn wait_for_admin(log: &Path, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(addr) = admin_in_log(log) {
            return Some(addr);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn scrape(addr: &str) -> Result<String> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await??;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut response)).await??;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// The sum of every sample of `name` (all label sets).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Rows of the pipeline's result for each year, computed by DataFusion on one node.
async fn expected_rows(root: &Path, years: &[i32]) -> Result<BTreeMap<i32, u64>> {
    use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
    let ctx = SessionContext::new();
    ctx.register_parquet(
        "orders",
        format!("{}/data/orders/", root.display()),
        ParquetReadOptions::default(),
    )
    .await?;
    ctx.register_csv(
        "lineitem",
        format!("{}/data/lineitem/", root.display()),
        CsvReadOptions::new().has_header(true),
    )
    .await?;
    let mut out = BTreeMap::new();
    for year in years {
        if out.contains_key(year) {
            continue;
        }
        let sql = SQL
            .replace("${start}", &format!("{year}-01-01"))
            .replace("${end}", &format!("{}-01-01", year + 1));
        let rows: usize = ctx
            .sql(&sql)
            .await?
            .collect()
            .await?
            .iter()
            .map(|b| b.num_rows())
            .sum();
        out.insert(*year, rows as u64);
    }
    Ok(out)
}

/// Added rows of every snapshot of the table, by the job id in its summary.
async fn committed_snapshots(root: &Path) -> Result<HashMap<String, Vec<u64>>> {
    use nightshift_core::storage::Location;
    use nightshift_core::table::{CatalogConfig, open_catalog, parse_table_ident};
    let catalog = open_catalog(&CatalogConfig::Sql {
        name: "nightshift".into(),
        uri: format!("sqlite:{}/catalog.db?mode=rwc", root.display()),
        warehouse: Location::parse(&format!("{}/warehouse", root.display()), Path::new("/"))?,
    })
    .await?;
    let table = catalog
        .load_table(&parse_table_ident("bench.autoscale")?)
        .await?;
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for snapshot in table.metadata().snapshots() {
        let summary = &snapshot.summary().additional_properties;
        let job = summary
            .get("nightshift.job-id")
            .cloned()
            .unwrap_or_default();
        let rows = summary
            .get("added-records")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        out.entry(job).or_default().push(rows);
    }
    Ok(out)
}

fn write_timeline(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut csv = String::from("seconds,workers,desired,ready,running,tasks_done,jobs_done\n");
    for s in samples {
        csv.push_str(&format!(
            "{:.1},{},{},{},{},{},{}\n",
            s.t, s.workers, s.desired, s.ready, s.running, s.tasks_done, s.jobs_done
        ));
    }
    std::fs::write(path, csv)?;
    Ok(())
}

/// Three stacked panels over one time axis: workers (and desired), queue length (ready and
/// running), tasks and jobs done.
fn chart(samples: &[Sample], args: &Args) -> String {
    const W: f64 = 900.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 20.0;
    const PANEL: f64 = 170.0;
    const GAP: f64 = 45.0;
    let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let x = |t: f64| LEFT + t / t_max * (W - LEFT - RIGHT);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{jobs} jobs in {waves} wave(s), workers {min}..{max} at {target} task(s) per worker, cool-down {cool} s</text>\n",
        h = 40.0 + 3.0 * (PANEL + GAP),
        jobs = args.jobs,
        waves = args.waves,
        min = args.min_workers,
        max = args.max_workers,
        target = args.target,
        cool = args.cooldown_secs
    );
    type Series<'a> = (&'a str, &'a str, Box<dyn Fn(&Sample) -> f64>, bool);
    let panels: Vec<(&str, Vec<Series>)> = vec![
        (
            "workers",
            vec![
                (
                    "running workers",
                    "#1f77b4",
                    Box::new(|s: &Sample| s.workers as f64),
                    true,
                ),
                (
                    "desired",
                    "#ff7f0e",
                    Box::new(|s: &Sample| s.desired as f64),
                    true,
                ),
            ],
        ),
        (
            "task messages",
            vec![
                (
                    "ready",
                    "#2ca02c",
                    Box::new(|s: &Sample| f64::from(s.ready)),
                    false,
                ),
                (
                    "running",
                    "#d62728",
                    Box::new(|s: &Sample| f64::from(s.running)),
                    false,
                ),
            ],
        ),
        (
            "done",
            vec![
                (
                    "tasks done",
                    "#9467bd",
                    Box::new(|s: &Sample| s.tasks_done as f64),
                    false,
                ),
                (
                    "jobs done × 10",
                    "#8c564b",
                    Box::new(|s: &Sample| s.jobs_done as f64 * 10.0),
                    true,
                ),
            ],
        ),
    ];
    for (i, (title, series)) in panels.iter().enumerate() {
        let top = 40.0 + i as f64 * (PANEL + GAP);
        let y_max = series
            .iter()
            .flat_map(|(_, _, f, _)| samples.iter().map(f))
            .fold(1.0_f64, f64::max)
            .ceil();
        let y = |v: f64| top + PANEL - v / y_max * PANEL;
        svg.push_str(&format!(
            "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{}\" height=\"{PANEL}\" fill=\"none\" stroke=\"#999\"/>\n\
             <text x=\"10\" y=\"{}\" font-weight=\"bold\">{title}</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y_max}</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>\n",
            W - LEFT - RIGHT,
            top + PANEL / 2.0,
            LEFT - 5.0,
            top + 10.0,
            LEFT - 5.0,
            top + PANEL
        ));
        for (j, (label, colour, value, step)) in series.iter().enumerate() {
            let mut points = String::new();
            let mut previous: Option<f64> = None;
            for s in samples {
                let v = value(s);
                if let (true, Some(p)) = (*step, previous) {
                    points.push_str(&format!("{:.1},{:.1} ", x(s.t), y(p)));
                }
                points.push_str(&format!("{:.1},{:.1} ", x(s.t), y(v)));
                previous = Some(v);
            }
            let dash = if j == 1 {
                " stroke-dasharray=\"5,3\""
            } else {
                ""
            };
            svg.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.8\"{dash} points=\"{points}\"/>\n\
                 <text x=\"{}\" y=\"{}\" fill=\"{colour}\">{label}</text>\n",
                LEFT + 10.0 + j as f64 * 160.0,
                top + 15.0
            ));
        }
    }
    let axis = 40.0 + 3.0 * (PANEL + GAP) - GAP + 15.0;
    let step = if t_max > 300.0 { 60.0 } else { 30.0 };
    let mut t = 0.0;
    while t <= t_max {
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{axis}\" text-anchor=\"middle\">{t:.0} s</text>\n",
            x(t)
        ));
        t += step;
    }
    svg.push_str("</svg>\n");
    svg
}
