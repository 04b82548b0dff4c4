//! Operating a cluster: the admin endpoint of both processes during a real job (metrics,
//! health, readiness while RabbitMQ is down), graceful stops (SIGTERM) of busy workers and of
//! the coordinator, and the dead-letter tools.

use std::time::{Duration, Instant};

use nightshift_tests::cluster::{
    ClusterOptions, ClusterSandbox, ClusterStorage, PrivateRabbit, http_get,
    orders_and_customers_spec,
};
use nightshift_tests::{RefSource, snapshot_count};

const SQL: &str = "SELECT o.o_orderdate AS order_date, c.c_mktsegment AS segment, COUNT(*) AS orders, \
     SUM(o.o_totalprice) AS total FROM orders o JOIN customer c ON c.c_custkey = o.o_custkey \
     WHERE o.o_orderdate < DATE '1993-01-01' GROUP BY o.o_orderdate, c.c_mktsegment";

/// Every process serves its admin endpoint on a port of its own choosing.
const ADMIN_ON_ANY_PORT: (&str, &str) = ("NIGHTSHIFT_METRICS_LISTEN", "127.0.0.1:0");

fn spec(data: &std::path::Path) -> String {
    orders_and_customers_spec(
        data,
        "ops_test",
        SQL,
        "tests.by_segment",
        "month(order_date)",
        4,
    )
}

fn start_with(options: ClusterOptions<'_>) -> ClusterSandbox {
    let cluster = ClusterSandbox::start_with(ClusterStorage::LocalWithPostgres, options);
    cluster.sandbox.tpch();
    cluster.sandbox.spec(&spec(&cluster.sandbox.path("data")));
    cluster
}

async fn assert_table_matches_reference(cluster: &ClusterSandbox) {
    let reference = cluster
        .sandbox
        .reference(
            SQL,
            &[
                RefSource::Parquet("orders", "data/orders/"),
                RefSource::Parquet("customer", "data/customer.parquet"),
            ],
        )
        .await;
    let read = cluster.read_table("tests.by_segment", Some(&reference));
    assert_eq!(snapshot_count(&read), 1, "{read:#}\n{}", cluster.logs());
    nightshift_tests::assert_matches_reference(&read);
}

fn assert_succeeded(cluster: &ClusterSandbox, outcome: &serde_json::Value) {
    assert_eq!(
        outcome["status"],
        "succeeded",
        "{outcome}\n{}",
        cluster.logs()
    );
}

/// The sum of the samples of `name` whose labels include every `label="value"` in `labels`
/// (histograms: name the `_count` or `_sum` series). `None` if the family has no sample.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (series_labels, value) = match rest.strip_prefix('{') {
            Some(rest) => match rest.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        if labels.iter().all(|l| series_labels.contains(l)) {
            let value: f64 = value.trim().parse().unwrap_or(f64::NAN);
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

fn admin(cluster: &ClusterSandbox, log: &str) -> String {
    cluster
        .admin_addr(log, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no admin endpoint in {log}\n{}", cluster.logs()))
}

/// Polls `GET path` until it answers `status`; returns the body.
fn wait_for_status(addr: &str, path: &str, status: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        match http_get(addr, path) {
            Ok((s, body)) if s == status => return body,
            other => last = Some(other),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{path} on {addr} never answered {status}; last: {last:?}")
}

/// What `pipe` says, collected by a thread as it comes.
fn read_in_background(
    mut pipe: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<String>> {
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let collected = text.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut buffer) {
            collected
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    text
}

fn wait_for_log(cluster: &ClusterSandbox, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cluster.logs().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no `{needle}` in the logs\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_coordinator_and_workers_during_a_real_job() {
    let mut cluster = start_with(ClusterOptions {
        workers: 2,
        env: &[
            ("FAILPOINTS", "worker-task-delay=return(300)"),
            ADMIN_ON_ANY_PORT,
        ],
        ..ClusterOptions::default()
    });
    // Customers broadcast to the join's tasks (the other tests here shuffle both sides).
    let data = cluster.sandbox.path("data");
    let broadcast = spec(&data).replace("broadcast_join_threshold_bytes = 0\n", "");
    assert_ne!(broadcast, spec(&data));
    cluster.sandbox.spec(&broadcast);
    let coordinator = admin(&cluster, &cluster.coordinator_log_name());
    let workers = [
        admin(&cluster, "worker-0.log"),
        admin(&cluster, "worker-1.log"),
    ];
    assert_eq!(http_get(&coordinator, "/healthz").unwrap().0, 200);
    let ready = wait_for_status(&coordinator, "/readyz", 200, Duration::from_secs(30));
    for dependency in [
        "rabbitmq: ok",
        "redis: ok",
        "object_store: ok",
        "catalog: ok",
    ] {
        assert!(ready.contains(dependency), "{ready}");
    }
    let ready = wait_for_status(&workers[0], "/readyz", 200, Duration::from_secs(30));
    assert!(
        ready.contains("rabbitmq: ok") && ready.contains("object_store: ok"),
        "{ready}"
    );

    let mut client = cluster.submit_in_background("job-metrics");
    // Stage 1 joins (customers read in place) and stage 2 aggregates and writes.
    wait_for_log(&cluster, "stage started stage=2");
    // Mid-job: the job is running on the coordinator and tasks on the workers.
    let during = scrape(&coordinator);
    assert_eq!(
        metric(&during, "nightshift_jobs", &["state=\"running\""]),
        Some(1.0),
        "{during}"
    );
    let running: f64 = workers
        .iter()
        .map(|w| metric(&scrape(w), "nightshift_tasks_running", &[]).unwrap())
        .sum();
    assert!((0.0..=2.0).contains(&running), "{running}");
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_succeeded(&cluster, &outcome);

    // API calls, an accepted one and a refused one.
    assert!(cluster.api_command(&["jobs"]).status.success());
    let refused = std::process::Command::new(nightshift_tests::nightshift_bin())
        .args(["status", "job-metrics", "--server", &cluster.api_url()])
        .env("NIGHTSHIFT_TOKEN", "wrong")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    // The queue sampler runs every 5 s.
    std::thread::sleep(Duration::from_secs(6));

    let c = scrape(&coordinator);
    let positive = |text: &str, name: &str, labels: &[&str]| {
        let value = metric(text, name, labels);
        assert!(
            value.is_some_and(|v| v > 0.0),
            "{name}{labels:?} = {value:?}\n{text}"
        );
    };
    positive(
        &c,
        "nightshift_jobs_finished_total",
        &["outcome=\"succeeded\""],
    );
    assert_eq!(metric(&c, "nightshift_jobs", &[]), Some(0.0), "{c}");
    positive(&c, "nightshift_tasks_published_total", &[]);
    let tasks = outcome["tasks"].as_f64().unwrap();
    assert_eq!(
        metric(&c, "nightshift_tasks_completed_total", &[]),
        Some(tasks),
        "{c}"
    );
    positive(&c, "nightshift_queue_consumers", &["queue=\"tasks\""]);
    assert_eq!(
        metric(&c, "nightshift_queue_messages", &["queue=\"tasks\""]),
        Some(0.0)
    );
    assert!(metric(&c, "nightshift_queue_messages", &["queue=\"dead\""]).is_some());
    positive(
        &c,
        "nightshift_api_requests_total",
        &["method=\"ListJobs\"", "code=\"OK\""],
    );
    positive(
        &c,
        "nightshift_api_requests_total",
        &["code=\"Unauthenticated\""],
    );
    positive(
        &c,
        "nightshift_api_request_duration_seconds_count",
        &["method=\"ListJobs\""],
    );
    positive(&c, "nightshift_dependency_up", &["dependency=\"catalog\""]);
    // Nothing failed: no retries, expiries, dead letters or conflicts, but the series exist.
    for name in [
        "nightshift_task_retries_total",
        "nightshift_task_lease_expiries_total",
        "nightshift_tasks_dead_lettered_total",
        "nightshift_commit_conflicts_total",
    ] {
        assert_eq!(metric(&c, name, &[]), Some(0.0), "{name}\n{c}");
    }
    assert_eq!(
        metric(
            &c,
            "nightshift_commit_duration_seconds_count",
            &["outcome=\"committed\""]
        ),
        Some(1.0),
        "{c}"
    );

    let w: Vec<String> = workers.iter().map(|w| scrape(w)).collect();
    let sum = |name: &str, labels: &[&str]| -> f64 {
        w.iter()
            .map(|text| metric(text, name, labels).unwrap_or(0.0))
            .sum()
    };
    assert_eq!(
        sum(
            "nightshift_tasks_finished_total",
            &["outcome=\"succeeded\""]
        ),
        tasks,
        "{w:?}"
    );
    for kind in ["stage_kind=\"shuffle\"", "stage_kind=\"table\""] {
        assert!(
            sum("nightshift_task_duration_seconds_count", &[kind]) > 0.0,
            "{w:?}"
        );
        assert!(sum("nightshift_task_duration_seconds_sum", &[kind]) > 0.0);
        assert!(sum("nightshift_rows_written_total", &[kind]) > 0.0, "{w:?}");
        assert!(
            sum("nightshift_bytes_written_total", &[kind]) > 0.0,
            "{w:?}"
        );
    }
    assert!(sum("nightshift_shuffle_bytes_written_total", &[]) > 0.0);
    // The join with `customer` is broadcast; each worker builds its table for the stage
    // once, and a worker that runs two of the stage's four tasks probes it again.
    let built = sum("nightshift_broadcast_joins_total", &["table=\"built\""]);
    let shared = sum("nightshift_broadcast_joins_total", &["table=\"shared\""]);
    assert!((1.0..=2.0).contains(&built), "built {built}: {w:?}");
    assert!(
        shared >= 1.0 && built + shared == 4.0,
        "built {built}, shared {shared}: {w:?}"
    );
    assert_eq!(sum("nightshift_tasks_running", &[]), 0.0);
    // Scans of the sources and readers of shuffle output both count what they read: the
    // final stage reads only shuffle output.
    for kind in ["stage_kind=\"shuffle\"", "stage_kind=\"table\""] {
        assert!(
            sum("nightshift_rows_read_total", &[kind]) > 0.0,
            "{kind}: {w:?}"
        );
        assert!(
            sum("nightshift_bytes_read_total", &[kind]) > 0.0,
            "{kind}: {w:?}"
        );
    }
    assert_table_matches_reference(&cluster).await;
    cluster.kill_coordinator();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_goes_unready_while_rabbitmq_is_down() {
    // A private broker: stopping the machine's shared one would break the other tests.
    let rabbit = PrivateRabbit::start();
    let cluster = start_with(ClusterOptions {
        workers: 1,
        env: &[ADMIN_ON_ANY_PORT],
        rabbitmq_url: Some(rabbit.url()),
        ..ClusterOptions::default()
    });
    let endpoints = [
        admin(&cluster, &cluster.coordinator_log_name()),
        admin(&cluster, "worker-0.log"),
    ];
    for addr in &endpoints {
        wait_for_status(addr, "/readyz", 200, Duration::from_secs(30));
    }
    rabbit.stop_app();
    for addr in &endpoints {
        let body = wait_for_status(addr, "/readyz", 503, Duration::from_secs(30));
        assert!(body.contains("rabbitmq: "), "{body}");
        assert!(!body.contains("rabbitmq: ok"), "{body}");
        assert!(body.contains("redis: ok"), "{body}");
        // Alive all the same: liveness must not restart a process waiting for its broker.
        assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
    }
    let metrics = scrape(&endpoints[0]);
    assert_eq!(
        metric(
            &metrics,
            "nightshift_dependency_up",
            &["dependency=\"rabbitmq\""]
        ),
        Some(0.0),
        "{metrics}"
    );
    rabbit.start_app();
    for addr in &endpoints {
        wait_for_status(addr, "/readyz", 200, Duration::from_secs(90));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_busy_worker_finishes_its_task_and_exits_0() {
    let mut cluster = start_with(ClusterOptions {
        workers: 1,
        env: &[("FAILPOINTS", "worker-task-delay=return(1500)")],
        ..ClusterOptions::default()
    });
    let mut client = cluster.submit_in_background("job-drain-finish");
    assert!(
        cluster.wait_for_task_start(0, Duration::from_secs(30)),
        "{}",
        cluster.logs()
    );
    cluster.start_worker();
    let status = cluster.terminate_worker(0);
    assert!(status.success(), "{status}\n{}", cluster.logs());
    let log = cluster.worker_log(0);
    assert!(
        log.contains("shutdown requested; finishing the running task")
            && log.contains("running task finished and acked"),
        "{log}"
    );
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_succeeded(&cluster, &outcome);
    assert_table_matches_reference(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_prefetch_two_runs_two_tasks_at_once_and_drains_both() {
    let mut cluster = start_with(ClusterOptions {
        workers: 1,
        env: &[
            ("FAILPOINTS", "worker-task-delay=return(2000)"),
            ("NIGHTSHIFT_RABBITMQ_PREFETCH", "2"),
        ],
        ..ClusterOptions::default()
    });
    let mut client = cluster.submit_in_background("job-two-lanes");
    // Two tasks started before any finished: they run at once (one lane would finish the
    // first, 2 s later, before starting the second).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = cluster.worker_log(0);
        assert!(
            !log.contains("task finished"),
            "a task finished before a second one started:\n{log}"
        );
        if log.matches("task started worker=").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.start_worker();
    let status = cluster.terminate_worker(0);
    assert!(status.success(), "{status}\n{}", cluster.logs());
    let log = cluster.worker_log(0);
    assert!(log.contains("lanes=2"), "{log}");
    assert_eq!(
        log.matches("running task finished and acked").count(),
        2,
        "both running tasks finish and are acked before the worker stops:\n{log}"
    );
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_succeeded(&cluster, &outcome);
    assert_table_matches_reference(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_worker_past_its_grace_requeues_the_task_and_exits_0() {
    let mut cluster = start_with(ClusterOptions {
        workers: 1,
        env: &[
            ("FAILPOINTS", "worker-task-delay=return(3000)"),
            ("NIGHTSHIFT_DRAIN_GRACE_SECS", "1"),
        ],
        ..ClusterOptions::default()
    });
    let mut client = cluster.submit_in_background("job-drain-requeue");
    assert!(
        cluster.wait_for_task_start(0, Duration::from_secs(30)),
        "{}",
        cluster.logs()
    );
    let stopping = Instant::now();
    let status = cluster.terminate_worker(0);
    assert!(status.success(), "{status}\n{}", cluster.logs());
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );
    let log = cluster.worker_log(0);
    assert!(log.contains("task handed back to the queue"), "{log}");
    assert!(!log.contains("task finished"), "{log}");
    cluster.start_worker();
    cluster.start_worker();
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_succeeded(&cluster, &outcome);
    assert_table_matches_reference(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_coordinator_leaves_its_job_to_the_next_one() {
    let mut cluster = start_with(ClusterOptions {
        workers: 2,
        env: &[("FAILPOINTS", "worker-task-delay=return(700)")],
        ..ClusterOptions::default()
    });
    let mut client = cluster.submit_in_background("job-coordinator-drain");
    wait_for_log(&cluster, "stage started stage=3");
    // A scheduler following the job through the API, as `submit --wait` does after submitting:
    // it goes on watching through the handover (it used to exit 1 with the job still running).
    let mut watch = cluster.api_command_in_background(&["watch", "job-coordinator-drain"]);
    let watched = read_in_background(watch.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !watched.lock().unwrap().contains("running") {
        assert!(Instant::now() < deadline, "{}", watched.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopping = Instant::now();
    let status = cluster.terminate_coordinator();
    assert!(status.success(), "{status}\n{}", cluster.logs());
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
    assert!(
        cluster
            .coordinator_log()
            .contains("running jobs are left to the next coordinator"),
        "{}",
        cluster.coordinator_log()
    );
    cluster.start_coordinator();
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_succeeded(&cluster, &outcome);
    assert!(
        cluster.coordinator_log().contains("resuming"),
        "{}",
        cluster.logs()
    );
    let status = watch.wait().expect("watch");
    let stderr = watched.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("lost the watch") && stderr.contains("succeeded"),
        "{stderr}"
    );
    assert_table_matches_reference(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_task_on_every_line() {
    let cluster = start_with(ClusterOptions {
        workers: 1,
        env: &[("NIGHTSHIFT_LOG_FORMAT", "json")],
        ..ClusterOptions::default()
    });
    let outcome = cluster.submit("job-json-logs", &[]);
    assert_succeeded(&cluster, &outcome);
    let log = cluster.worker_log(0);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let task_lines: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("task "))
        })
        .collect();
    assert!(task_lines.len() >= 2, "{log}");
    for line in task_lines {
        let span = &line["span"];
        assert_eq!(span["job_id"], "job-json-logs", "{line}");
        for field in ["stage", "task", "attempt"] {
            assert!(span[field].is_number(), "{field} in {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_for_running_jobs_only() {
    use nightshift_core::transport::TaskQueue;
    use prost::Message;
    // Every worker dies on stage 1's task; with delivery_limit = 1 the broker dead-letters
    // it after two deliveries and the job fails.
    let mut cluster = start_with(ClusterOptions {
        workers: 3,
        env: &[
            ("FAILPOINTS", "worker-crash-on-stage=return(1)"),
            ADMIN_ON_ANY_PORT,
        ],
        delivery_limit: 1,
        ..ClusterOptions::default()
    });
    let coordinator = admin(&cluster, &cluster.coordinator_log_name());
    let outcome = cluster.submit("job-poison", &[]);
    assert_eq!(outcome["status"], "failed", "{outcome}\n{}", cluster.logs());
    let metrics = scrape(&coordinator);
    assert_eq!(
        metric(&metrics, "nightshift_tasks_dead_lettered_total", &[]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "nightshift_jobs_finished_total",
            &["outcome=\"task_failed\""]
        ),
        None
    );
    assert_eq!(
        metric(
            &metrics,
            "nightshift_jobs_finished_total",
            &["outcome=\"failed\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    for i in 0..3 {
        cluster.kill_worker(i);
    }

    // A task of a job that is still running (no coordinator has ended it), dead-lettered by
    // a consumer that gives it back twice.
    let queue =
        nightshift_cluster::RabbitQueue::connect(&nightshift_cluster::config::RabbitSection {
            url: cluster.rabbitmq_url.clone(),
            prefix: cluster.prefix.clone(),
            prefetch: 1,
            delivery_limit: 1,
        })
        .await
        .unwrap();
    let task = nightshift_proto::v1::TaskDefinition {
        job_id: "job-live".into(),
        stage_id: 1,
        partition: 3,
        attempt: 1,
        ..Default::default()
    };
    queue
        .publish_task(task.encode_to_vec().into())
        .await
        .unwrap();
    for _ in 0..2 {
        let delivery = queue.next_task().await.unwrap().unwrap();
        delivery.nack(true).await.unwrap();
    }
    let dead = format!("{}.dead", cluster.prefix);
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.queue_depth(&dead).await.unwrap() < 2 {
        assert!(
            Instant::now() < deadline,
            "the live task was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let config = cluster.config.to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(nightshift_tests::nightshift_bin())
            .args(args)
            .args(["--config", &config])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let listed = run(&["dlq", "list"]);
    assert!(
        listed.contains("job-poison") && listed.contains("job-live"),
        "{listed}"
    );
    let json: Vec<serde_json::Value> = run(&["dlq", "list", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let poison = json.iter().find(|l| l["job_id"] == "job-poison").unwrap();
    assert_eq!(poison["stage"], 1, "{poison}");
    assert_eq!(poison["reason"], "delivery_limit", "{poison}");
    assert_eq!(poison["deliveries"], 2, "{poison}");
    assert_eq!(poison["job_state"], "failed", "{poison}");
    assert!(
        poison["last_error"]
            .as_str()
            .unwrap()
            .contains("dead-lettered"),
        "{poison}"
    );
    let live = json.iter().find(|l| l["job_id"] == "job-live").unwrap();
    assert_eq!(
        (live["stage"].as_u64(), live["partition"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(live["job_state"], "unknown", "{live}");

    // The listings gave the messages back; wait until the broker holds both again.
    while queue.queue_depth(&dead).await.unwrap() < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replayed = run(&["dlq", "replay", "--all"]);
    assert!(replayed.contains("requeued 1 task(s)"), "{replayed}");
    assert!(
        replayed.contains("kept 1 task(s) of job job-poison: the job has failed"),
        "{replayed}"
    );
    // The kept task returns to the dead-letter queue when replay's channel closes, which
    // the broker applies a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.queue_depth(&dead).await.unwrap() != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queue.queue_depth(&dead).await.unwrap(), 1);
    // Back in the task queue (this test's consumer takes it at once).
    let requeued = tokio::time::timeout(Duration::from_secs(10), queue.next_task())
        .await
        .expect("the replayed task is delivered")
        .unwrap()
        .unwrap();
    assert_eq!(
        nightshift_proto::v1::TaskDefinition::decode(requeued.payload()).unwrap(),
        task
    );
    assert_eq!(requeued.redeliveries(), 0, "a fresh delivery count");
    requeued.ack().await.unwrap();
    let again = run(&["dlq", "replay", "job-poison"]);
    assert!(again.contains("requeued 0 task(s)"), "{again}");

    // The failed job's task would stay listed for good: purge removes it. A task of a job
    // not known to have ended stays.
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.queue_depth(&dead).await.unwrap() != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let purged = run(&["dlq", "purge", "--all"]);
    assert!(
        purged.contains("removed 1 task(s)") && purged.contains("job job-poison (failed)"),
        "{purged}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.queue_depth(&dead).await.unwrap() != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queue.queue_depth(&dead).await.unwrap(), 0);
    assert!(!run(&["dlq", "list"]).contains("job-poison"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_runs_several_jobs_at_once() {
    // Submissions stay unacked while their jobs run: with the workers' prefetch of 1 the
    // broker handed the coordinator one job at a time, whatever --max-jobs said.
    let mut cluster = start_with(ClusterOptions {
        workers: 0,
        ..ClusterOptions::default()
    });
    let mut first = cluster.submit_in_background("job-at-once-1");
    let mut second = cluster.submit_in_background("job-at-once-2");
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.coordinator_log().matches("job accepted").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "both jobs should run before any task is done\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.start_worker();
    cluster.start_worker();
    for client in [&mut first, &mut second] {
        let outcome = cluster.wait_for_outcome(client);
        assert_succeeded(&cluster, &outcome);
    }
}
