//! Faults in every order on the real services, and what they may leave behind: nothing.
//! After each job, while the cluster keeps running, the table directory must hold exactly the
//! files its snapshots reference (PyIceberg's view) and the scratch space must be empty.
//!
//! `NIGHTSHIFT_FAULT_ROUNDS` (default 2) sets how many randomized rounds run;
//! `NIGHTSHIFT_FAULT_SEED` replays one seed (each round prints its seed).

use std::time::{Duration, Instant};

use nightshift_tests::cluster::{
    ClusterOptions, ClusterSandbox, ClusterStorage, PrivateRedis, orders_and_customers_spec,
};
use nightshift_tests::{RefSource, snapshot_count};
use serde_json::Value;

const TABLE: &str = "tests.by_segment";
const SQL: &str = "SELECT o.o_orderdate AS order_date, c.c_mktsegment AS segment, COUNT(*) AS orders, \
     SUM(o.o_totalprice) AS total FROM orders o JOIN customer c ON c.c_custkey = o.o_custkey \
     WHERE o.o_orderdate < DATE '1993-06-01' GROUP BY o.o_orderdate, c.c_mktsegment";

/// How long after a job's end its leftovers must be gone.
const CLEAN_WITHIN: Duration = Duration::from_secs(60);

fn spec(data: &std::path::Path) -> String {
    orders_and_customers_spec(data, "faults", SQL, TABLE, "month(order_date)", 4)
}

fn start(options: ClusterOptions<'_>) -> ClusterSandbox {
    let cluster = ClusterSandbox::start_with(ClusterStorage::LocalWithPostgres, options);
    cluster.sandbox.tpch();
    cluster.sandbox.spec(&spec(&cluster.sandbox.path("data")));
    cluster
}

async fn reference(cluster: &ClusterSandbox) -> std::path::PathBuf {
    cluster
        .sandbox
        .reference(
            SQL,
            &[
                RefSource::Parquet("orders", "data/orders/"),
                RefSource::Parquet("customer", "data/customer.parquet"),
            ],
        )
        .await
}

/// The coordinator log's `planned stages=N`, once the job is planned.
fn planned_stages(cluster: &ClusterSandbox) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = cluster.coordinator_log();
        if let Some(n) = log
            .split("planned stages=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
        {
            return n;
        }
        assert!(Instant::now() < deadline, "{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the first attempt of each of the `tasks` tasks of `stage` has started on one
/// of the `workers` workers.
fn wait_for_first_attempts(cluster: &ClusterSandbox, workers: usize, stage: u32, tasks: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let needle = "task started worker=";
    let ours = format!(" stage={stage} task=");
    loop {
        let started: std::collections::BTreeSet<String> = (0..workers)
            .flat_map(|i| {
                cluster
                    .worker_log(i)
                    .lines()
                    .filter(|l| {
                        l.contains(needle) && l.contains(&ours) && l.ends_with(" attempt=1")
                    })
                    .map(|l| l.rsplit(" task=").next().unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        if started.len() >= tasks {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "first attempts of stage {stage} started: {started:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_log(cluster: &ClusterSandbox, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cluster.coordinator_log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no `{needle}`\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The job's snapshot is the only one, holds the right rows for both readers, and nothing
/// else is left after [`CLEAN_WITHIN`].
async fn assert_one_snapshot_and_clean(cluster: &ClusterSandbox, job: &str, what: &str) {
    let reference = reference(cluster).await;
    let read = cluster.read_table(TABLE, Some(&reference));
    assert_eq!(
        snapshot_count(&read),
        1,
        "{what}: {read:#}\n{}",
        cluster.logs()
    );
    assert_eq!(
        read["snapshots"][0]["summary"]["nightshift.job-id"], job,
        "{what}"
    );
    nightshift_tests::assert_matches_reference(&read);
    let left = cluster.wait_until_clean(TABLE, CLEAN_WITHIN);
    assert!(
        left.is_empty(),
        "{what}: left behind a minute after the job ended: {left:#?}\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_final_stage_attempts_leave_no_orphans() {
    // The coordinator dies while the final stage runs. The first attempts finish and queue
    // their results while no coordinator runs; the next coordinator republishes the final
    // tasks (idle workers start them at once), takes the queued results and commits while
    // the republished attempts have written their files but not yet reported them. The
    // report delay is long enough for the commit to land first even on a loaded machine (at
    // 1.5 s a slow commit was sometimes overtaken, and no late writer happened).
    let mut cluster = start(ClusterOptions {
        workers: 4,
        env: &[("FAILPOINTS", "worker-report-delay=return(4000)")],
        ..ClusterOptions::default()
    });
    let mut client = cluster.submit_in_background("job-late-writers");
    let stages = planned_stages(&cluster);
    wait_for_log(&cluster, &format!("stage started stage={stages}"));
    // Killed only once every first attempt runs: "stage started" is logged before the
    // tasks are sent, and a task not sent before the kill has no first attempt to queue a
    // result; its one attempt is the republished one, which reports before the commit.
    wait_for_first_attempts(&cluster, 4, stages, 4);
    cluster.kill_coordinator();
    std::thread::sleep(Duration::from_millis(2500));
    cluster.start_coordinator();
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_eq!(
        outcome["status"],
        "succeeded",
        "{outcome}\n{}",
        cluster.logs()
    );
    // The late attempts report (and find the job ended) only after their report delay.
    let deadline = Instant::now() + CLEAN_WITHIN;
    let late_writers = |logs: &str| {
        logs.matches("the job ended while the task ran").count()
            + logs.matches("late sweep removed").count()
    };
    while late_writers(&cluster.logs()) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs = cluster.logs();
    assert!(
        late_writers(&logs) > 0,
        "the scenario did not happen: no late writer\n{logs}"
    );
    assert_one_snapshot_and_clean(&cluster, "job-late-writers", "late writers").await;
}

/// One fault, applied to the running cluster.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillWorker,
    RestartCoordinator,
    FlushRedis,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_end_with_one_snapshot_and_nothing_left() {
    let rounds: usize = std::env::var("NIGHTSHIFT_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let fixed_seed: Option<u64> = std::env::var("NIGHTSHIFT_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok());
    for round in 0..rounds {
        let seed = fixed_seed.unwrap_or_else(|| fastrand::u64(..));
        eprintln!("fault round {round}: NIGHTSHIFT_FAULT_SEED={seed}");
        fault_round(seed).await;
    }
}

async fn fault_round(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let redis = PrivateRedis::start();
    // Slow tasks, workers that die between reporting and acking (duplicate deliveries),
    // and attempts slow to report what they wrote (late writers).
    let failpoints = format!(
        "worker-task-delay=return({});worker-crash-after-publish=4%return;worker-report-delay=10%return(1500)",
        rng.u64(200..800)
    );
    let mut cluster = start(ClusterOptions {
        workers: 2,
        env: &[("FAILPOINTS", &failpoints)],
        redis_url: redis.url(),
        delivery_limit: 20,
        ..ClusterOptions::default()
    });
    let job = format!("job-faults-{seed}");
    let mut client = cluster.submit_in_background(&job);
    let mut faults = Vec::new();
    let mut flushed = false;
    let faults_wanted = rng.usize(1..=4);
    while client.try_wait().expect("client").is_none() {
        std::thread::sleep(Duration::from_millis(rng.u64(300..2500)));
        keep_alive(&mut cluster);
        if faults.len() >= faults_wanted {
            continue;
        }
        let fault = match rng.u8(0..10) {
            0..=4 => Fault::KillWorker,
            5..=7 => Fault::RestartCoordinator,
            _ if flushed => Fault::KillWorker,
            _ => Fault::FlushRedis,
        };
        match fault {
            Fault::KillWorker => {
                let running = cluster.running_workers();
                if let Some(i) = (!running.is_empty()).then(|| running[rng.usize(..running.len())])
                {
                    cluster.kill_worker(i);
                    cluster.start_worker();
                }
            }
            Fault::RestartCoordinator => {
                cluster.kill_coordinator();
                std::thread::sleep(Duration::from_millis(rng.u64(0..1500)));
                cluster.start_coordinator();
            }
            Fault::FlushRedis => {
                redis.flushall();
                flushed = true;
            }
        }
        faults.push(fault);
    }
    let what = format!("seed {seed}, faults {faults:?}");
    let mut outcome = cluster.wait_for_outcome(&mut client);
    // A flushed state store may make the job fail (it commits nothing then); the same job id
    // submitted again must then land exactly once.
    for _ in 0..2 {
        if outcome["status"] == "succeeded" {
            break;
        }
        let read: Value = cluster.read_table(TABLE, None);
        assert_eq!(
            snapshot_count(&read),
            0,
            "{what}: a failed job committed: {read:#}"
        );
        assert!(
            flushed,
            "{what}: failed without a flush: {outcome}\n{}",
            cluster.logs()
        );
        keep_alive(&mut cluster);
        outcome = cluster.submit(&job, &[]);
    }
    assert_eq!(
        outcome["status"],
        "succeeded",
        "{what}: {outcome}\n{}",
        cluster.logs()
    );
    assert_one_snapshot_and_clean(&cluster, &job, &what).await;
    eprintln!("fault round passed: {what}");
}

/// Replaces crashed workers (the crash-after-publish failpoint kills some) and a dead
/// coordinator.
fn keep_alive(cluster: &mut ClusterSandbox) {
    while cluster.running_workers().len() < 2 {
        cluster.start_worker();
    }
    if !cluster.coordinator_running() {
        cluster.reap_coordinator();
        cluster.start_coordinator();
    }
}

/// A submission that stops every coordinator taking it (a failpoint aborts the process while
/// the job is admitted, as a stack overflow in planning did) is given up on at its fifth
/// delivery instead of stopping coordinators forever: the job ends failed, saying why, and
/// the coordinator that gave up keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_that_stops_every_coordinator_is_given_up_on() {
    let mut cluster = start(ClusterOptions {
        workers: 0,
        env: &[("FAILPOINTS", "coordinator-abort-while-admitting=return")],
        ..ClusterOptions::default()
    });
    let mut client = cluster.submit_in_background("poison-1");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut starts = 1;
    while client.try_wait().expect("client status").is_none() {
        assert!(Instant::now() < deadline, "{}", cluster.logs());
        if !cluster.coordinator_running() {
            cluster.reap_coordinator();
            cluster.start_coordinator();
            starts += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_eq!(outcome["status"], "failed", "{outcome:#}");
    let error = outcome.to_string();
    assert!(
        error.contains("delivered 5 times"),
        "{outcome:#}\n{}",
        cluster.logs()
    );
    assert_eq!(starts, 5, "four coordinators stopped, the fifth gave up");
    assert!(cluster.coordinator_running(), "{}", cluster.logs());
    assert_eq!(snapshot_count(&cluster.read_table(TABLE, None)), 0);
}
