//! Cluster mode against the machine's RabbitMQ, Redis and PostgreSQL: a coordinator and
//! worker processes of the real binary, killed and restarted mid-job.

use std::time::Duration;

use nightshift_tests::cluster::{
    ClusterOptions, ClusterSandbox, ClusterStorage, PrivateRabbit, PrivateRedis,
    orders_and_customers_spec,
};
use nightshift_tests::{RefSource, snapshot_count};

const SQL: &str = "SELECT o.o_orderdate AS order_date, c.c_mktsegment AS segment, COUNT(*) AS orders, \
     SUM(o.o_totalprice) AS total, SUM(o.o_custkey) AS custkeys FROM orders o JOIN customer c ON c.c_custkey = o.o_custkey \
     WHERE o.o_orderdate < DATE '1993-01-01' GROUP BY o.o_orderdate, c.c_mktsegment";

fn spec(data: &std::path::Path) -> String {
    orders_and_customers_spec(
        data,
        "cluster_test",
        SQL,
        "tests.by_segment",
        "month(order_date)",
        4,
    )
}

fn start(workers: usize, env: &[(&str, &str)]) -> ClusterSandbox {
    prepare(ClusterSandbox::start(
        ClusterStorage::LocalWithPostgres,
        workers,
        env,
    ))
}

fn prepare(cluster: ClusterSandbox) -> ClusterSandbox {
    cluster.sandbox.tpch();
    cluster.sandbox.spec(&spec(&cluster.sandbox.path("data")));
    cluster
}

/// Asserts one snapshot whose content equals DataFusion's on one node.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_three_workers_commit_one_snapshot() {
    let cluster = start(3, &[]);
    let outcome = cluster.submit("job-a", &[]);
    assert_eq!(
        outcome["status"],
        "succeeded",
        "{outcome}\n{}",
        cluster.logs()
    );
    assert!(outcome["tasks"].as_u64().unwrap() > 4, "{outcome}");
    assert_table_matches_reference(&cluster).await;
    let busy = (0..3)
        .filter(|i| cluster.worker_log(*i).contains("task finished"))
        .count();
    assert!(
        busy >= 2,
        "tasks should spread over the workers\n{}",
        cluster.logs()
    );
    assert!(
        cluster.scratch_files().is_empty(),
        "scratch left: {:?}",
        cluster.scratch_files()
    );

    // The same job id again: nothing new.
    let again = cluster.submit("job-a", &[]);
    assert_eq!(again["already_committed"], true, "{again}");
    assert_eq!(again["snapshot_id"], outcome["snapshot_id"]);
    assert_eq!(again["rows"], outcome["rows"], "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sees_the_commit_first_still_answers_with_the_report() {
    // The coordinator stores its report 8 s after the commit; the client reads the table's
    // history every 5 s, so it finds the snapshot first. It waits for the report (rows,
    // files) rather than answer from the history alone.
    let cluster = start(
        1,
        &[("FAILPOINTS", "coordinator-report-delay=return(8000)")],
    );
    let outcome = cluster.submit("job-late-report", &[]);
    assert_succeeded(&cluster, &outcome);
    assert!(outcome["rows"].as_u64().unwrap_or(0) > 0, "{outcome}");
    assert!(outcome["files"].as_u64().unwrap_or(0) > 0, "{outcome}");
    assert!(outcome.get("note").is_none(), "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_task_is_replaced_without_duplicates() {
    let mut cluster = start(1, &[("FAILPOINTS", "worker-task-delay=return(1500)")]);
    let mut client = cluster.submit_in_background("job-kill-worker");
    assert!(
        cluster.wait_for_task_start(0, Duration::from_secs(30)),
        "{}",
        cluster.logs()
    );
    cluster.kill_worker(0); // kill -9 while the task runs; RabbitMQ redelivers it
    cluster.start_worker();
    cluster.start_worker();
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_succeeded(&cluster, &outcome);
    assert_table_matches_reference(&cluster).await;
}

/// Runs `job` and kills the coordinator once stage 3 starts (stages 1 and 2 complete, their
/// outputs in Redis); runs `while_down`, starts a coordinator again, and asserts the job
/// succeeds with one snapshot equal to DataFusion's read of the sources as they are then.
async fn restart_coordinator_at_stage_3(
    job: &str,
    while_down: impl FnOnce(&ClusterSandbox),
) -> ClusterSandbox {
    let mut cluster = start(2, &[("FAILPOINTS", "worker-task-delay=return(700)")]);
    let mut client = cluster.submit_in_background(job);
    wait_for_stage(&cluster, 3);
    cluster.kill_coordinator();
    while_down(&cluster);
    std::thread::sleep(Duration::from_millis(500));
    cluster.start_coordinator();
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_succeeded(&cluster, &outcome);
    assert_table_matches_reference(&cluster).await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_mid_job_resumes_and_commits_once() {
    let cluster = restart_coordinator_at_stage_3("job-kill-coordinator", |_| {}).await;
    assert!(
        cluster.logs().contains("resuming"),
        "the restarted coordinator should reuse outputs\n{}",
        cluster.logs()
    );
    assert!(
        !cluster.logs().contains("planned differently"),
        "the same sources plan the same\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restarted_after_its_sources_changed_never_mixes_two_plans() {
    // A file lands in the orders directory while no coordinator runs: the restarted one
    // plans other scan tasks, so the outputs recorded under the first plan must not be
    // reused (they read the directory without the file).
    let cluster = restart_coordinator_at_stage_3("job-sources-change", |cluster| {
        let orders = cluster.sandbox.path("data/orders");
        let first = std::fs::read_dir(&orders)
            .unwrap()
            .map(|e| e.unwrap().path())
            .min()
            .expect("an orders file");
        std::fs::copy(&first, orders.join("zz-late-arrival.parquet")).unwrap();
    })
    .await;
    assert!(
        cluster.logs().contains("planned differently"),
        "the restarted coordinator should see the plan changed\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_task_fails_the_job_and_commits_nothing() {
    let cluster = start(2, &[]);
    cluster
        .sandbox
        .write("data/bad.csv", "id,amount\n1,2.50\nx,3.00\n");
    cluster.sandbox.spec(&format!(
        "[pipeline]\nname = \"bad\"\n[[source]]\nname = \"src\"\nformat = \"csv\"\nlocation = \"{}\"\n\
         [source.schema]\nid = \"bigint\"\n[transform]\nsql = \"SELECT * FROM src\"\n[target]\ntable = \"tests.bad\"\n",
        cluster.sandbox.path("data/bad.csv").display()
    ));
    let outcome = cluster.submit("job-bad", &[]);
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert_eq!(outcome["kind"], "task_failed", "{outcome}");
    let error = outcome["error"].as_str().unwrap();
    assert!(
        error.contains("bad.csv") && error.contains("column `id`"),
        "{error}"
    );
    assert!(
        !cluster.read_table("tests.bad", None)["exists"]
            .as_bool()
            .unwrap()
    );
    assert!(
        cluster.scratch_files().is_empty(),
        "{:?}",
        cluster.scratch_files()
    );
    assert!(
        cluster.sandbox.data_files().is_empty(),
        "{:?}",
        cluster.sandbox.data_files()
    );
}

/// Waits until the coordinator has started stage `n` (its inputs are then recorded).
fn wait_for_stage(cluster: &ClusterSandbox, n: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cluster
        .coordinator_log()
        .contains(&format!("stage started stage={n}"))
    {
        assert!(std::time::Instant::now() < deadline, "{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restart_mid_job_reconnects_and_completes() {
    // A private broker: stopping the machine's shared one would break the other tests.
    let rabbit = PrivateRabbit::start();
    let cluster = prepare(ClusterSandbox::start_with(
        ClusterStorage::LocalWithPostgres,
        ClusterOptions {
            workers: 2,
            env: &[("FAILPOINTS", "worker-task-delay=return(700)")],
            rabbitmq_url: Some(rabbit.url()),
            ..ClusterOptions::default()
        },
    ));
    let mut client = cluster.submit_in_background("job-rabbit-restart");
    wait_for_stage(&cluster, 3);
    rabbit.restart_app(Duration::from_millis(1500));
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_succeeded(&cluster, &outcome);
    assert_table_matches_reference(&cluster).await;
    assert!(
        cluster.logs().contains("reconnected to rabbitmq"),
        "{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushall_mid_job_never_commits_twice_or_partially() {
    let redis = PrivateRedis::start();
    let cluster = prepare(ClusterSandbox::start_with(
        ClusterStorage::LocalWithPostgres,
        ClusterOptions {
            workers: 2,
            env: &[("FAILPOINTS", "worker-task-delay=return(700)")],
            redis_url: redis.url(),
            ..ClusterOptions::default()
        },
    ));
    let mut client = cluster.submit_in_background("job-flush");
    wait_for_stage(&cluster, 3);
    redis.flushall();
    let outcome = cluster.wait_for_outcome(&mut client);
    let read = cluster.read_table("tests.by_segment", None);
    match outcome["status"].as_str() {
        Some("succeeded") => assert_table_matches_reference(&cluster).await,
        _ => assert_eq!(
            snapshot_count(&read),
            0,
            "a failed job must commit nothing: {read:#}"
        ),
    }
    // Running the job again (Redis now knows nothing about it) never commits twice.
    let again = cluster.submit("job-flush", &[]);
    assert_eq!(again["status"], "succeeded", "{again}\n{}", cluster.logs());
    let read = cluster.read_table("tests.by_segment", None);
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_task_is_dead_lettered_and_fails_the_job() {
    // Every worker dies on stage 1's task (its only one: the broadcast build side); with
    // delivery_limit = 1 the broker dead-letters it after two deliveries. The third worker
    // runs the other stages' tasks, so the job can wait for them and end.
    let mut cluster = prepare(ClusterSandbox::start_with(
        ClusterStorage::LocalWithPostgres,
        ClusterOptions {
            workers: 3,
            env: &[("FAILPOINTS", "worker-crash-on-stage=return(1)")],
            delivery_limit: 1,
            ..ClusterOptions::default()
        },
    ));
    let outcome = cluster.submit("job-poison", &[]);
    assert_eq!(outcome["status"], "failed", "{outcome}\n{}", cluster.logs());
    let error = outcome["error"].as_str().unwrap();
    assert!(
        error.contains("stage 1") && error.contains("dead-lettered"),
        "{error}"
    );
    let crashed = (0..3).filter(|i| cluster.worker_exited(*i)).count();
    assert_eq!(
        crashed,
        2,
        "two deliveries, two dead workers\n{}",
        cluster.logs()
    );
    assert!(
        !cluster.read_table("tests.by_segment", None)["exists"]
            .as_bool()
            .unwrap()
    );
    assert!(
        cluster.scratch_files().is_empty(),
        "{:?}",
        cluster.scratch_files()
    );
    assert!(cluster.sandbox.data_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_scale_up_and_down_during_a_job() {
    let mut cluster = start(1, &[("FAILPOINTS", "worker-task-delay=return(400)")]);
    let mut client = cluster.submit_in_background("job-scale");
    assert!(
        cluster.wait_for_task_start(0, Duration::from_secs(30)),
        "{}",
        cluster.logs()
    );
    let added: Vec<usize> = (0..3).map(|_| cluster.start_worker()).collect();
    wait_for_stage(&cluster, 3);
    for i in added {
        cluster.stop_worker(i); // graceful: finishes its task, then exits
    }
    cluster.kill_worker(0); // and one abrupt loss
    cluster.start_worker();
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_succeeded(&cluster, &outcome);
    assert_table_matches_reference(&cluster).await;
    assert!(
        cluster.logs().contains("shutdown requested"),
        "{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_committing_to_one_table_both_land() {
    let cluster = start(3, &[]);
    let mut first = cluster.submit_in_background("job-concurrent-1");
    let mut second = cluster.submit_in_background("job-concurrent-2");
    for client in [&mut first, &mut second] {
        let outcome = cluster.wait_for_outcome(client);
        assert_succeeded(&cluster, &outcome);
    }
    let read = cluster.read_table("tests.by_segment", None);
    assert_eq!(snapshot_count(&read), 2, "{read:#}");
    let jobs: Vec<&str> = read["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["summary"]["nightshift.job-id"].as_str().unwrap())
        .collect();
    assert!(
        jobs.contains(&"job-concurrent-1") && jobs.contains(&"job-concurrent-2"),
        "{jobs:?}"
    );
    let one_run = {
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
        cluster.read_table("tests.by_segment", Some(&reference))["reference"]["rows"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(read["pyiceberg"]["rows"].as_u64().unwrap(), 2 * one_run);
    assert_eq!(read["duckdb"]["rows"], read["pyiceberg"]["rows"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_delivered_twice_write_no_duplicate_rows() {
    let mut cluster = start(0, &[]);
    let mut client = cluster.submit_in_background("job-twice");
    // Stages 1 (4 scan tasks) and 2 (1 task) are published at once; copy each message.
    wait_for_stage(&cluster, 2);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/duplicate_tasks.py");
    let out = std::process::Command::new(nightshift_tests::python())
        .arg(script)
        .args([
            &cluster.rabbitmq_url,
            &format!("{}.tasks", cluster.prefix),
            "5",
            "30",
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5");
    cluster.start_worker();
    cluster.start_worker();
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_succeeded(&cluster, &outcome);
    assert_table_matches_reference(&cluster).await;
    let stage1_runs: usize = (0..2)
        .map(|i| cluster.worker_log(i).matches("task finished").count())
        .sum();
    assert!(
        stage1_runs >= 5 + 5 + 8,
        "each copied task runs twice: {stage1_runs} runs\n{}",
        cluster.logs()
    );
    assert!(
        cluster.scratch_files().is_empty(),
        "{:?}",
        cluster.scratch_files()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_loses_its_lease_and_the_task_runs_elsewhere() {
    let mut cluster = prepare(ClusterSandbox::start_with(
        ClusterStorage::LocalWithPostgres,
        ClusterOptions {
            workers: 1,
            env: &[("FAILPOINTS", "worker-task-delay=return(2500)")],
            lease_secs: 2,
            ..ClusterOptions::default()
        },
    ));
    let mut client = cluster.submit_in_background("job-frozen");
    assert!(
        cluster.wait_for_task_start(0, Duration::from_secs(30)),
        "{}",
        cluster.logs()
    );
    cluster.freeze_worker(0); // alive, connected, silent: only the lease notices
    cluster.start_worker();
    cluster.start_worker();
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_succeeded(&cluster, &outcome);
    assert_table_matches_reference(&cluster).await;
    assert!(
        cluster.coordinator_log().contains("task lease expired"),
        "{}",
        cluster.logs()
    );
}

/// Asserts a job outcome says succeeded, with the cluster's logs otherwise.
fn assert_succeeded(cluster: &ClusterSandbox, outcome: &serde_json::Value) {
    assert_eq!(
        outcome["status"],
        "succeeded",
        "{outcome}\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_for_an_ended_job_is_returned_not_lost() {
    // A job's result queue is deleted when the job ends: a late result must come back as
    // unroutable (the worker then deletes what the task wrote), not count as delivered.
    let cluster = ClusterSandbox::start(ClusterStorage::LocalWithPostgres, 0, &[]);
    let config = nightshift_cluster::ClusterConfig::load(&cluster.config).unwrap();
    let queue = nightshift_cluster::RabbitQueue::connect(&config.rabbitmq)
        .await
        .unwrap();
    let job = nightshift_core::ids::JobId::parse("ended-job").unwrap();
    use nightshift_core::transport::TaskQueue;
    queue.open_results(&job).await.unwrap();
    queue
        .publish_result(&job, bytes::Bytes::from_static(b"r1"))
        .await
        .expect("the queue exists");
    queue.close_results(&job).await.unwrap();
    let err = queue
        .publish_result(&job, bytes::Bytes::from_static(b"r2"))
        .await
        .expect_err("the queue is gone");
    assert!(
        matches!(err, nightshift_core::CoreError::Unroutable { .. }),
        "{err}"
    );

    // A coordinator that lost the job while frozen asks for the deleted queue's results: it
    // is told the queue is gone (it reconnected about 20 times a second, for good, and
    // took no more jobs), and its other queues go on working.
    let frozen = nightshift_cluster::RabbitQueue::connect(&config.rabbitmq)
        .await
        .unwrap();
    let asked = tokio::time::timeout(Duration::from_secs(20), frozen.next_result(&job))
        .await
        .expect("an answer, not reconnecting for good");
    let err = asked.err().expect("the queue is gone").to_string();
    assert!(err.contains("no longer exists"), "{err}");
    let other = nightshift_core::ids::JobId::parse("ended-job-2").unwrap();
    frozen.open_results(&other).await.unwrap();
    frozen
        .publish_result(&other, bytes::Bytes::from_static(b"r3"))
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(20), frozen.next_result(&other))
        .await
        .expect("a result")
        .unwrap()
        .expect("a delivery");
    assert_eq!(delivery.payload(), b"r3");
    delivery.ack().await.unwrap();
    frozen.close_results(&other).await.unwrap();
}
