//! Cleanup never loses committed data: job ids that share a prefix, files that only the
//! history references, rollbacks, failed jobs; and a job always ends through one finish path
//! (a commit stands when cleanup fails, a job found committed ends succeeded, a cancel is
//! recorded as cancelled).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use nightshift::embedded::{SCRATCH_DIR, embedded_catalog, prepare_warehouse};
use nightshift_coordinator::{JobEnv, JobError, JobOptions, run_job};
use nightshift_core::ids::{JobId, TaskKey};
use nightshift_core::transport::memory::{MemoryQueue, MemoryState};
use nightshift_core::transport::{JobState, StateStore};
use nightshift_core::{CoreError, Result};
use nightshift_tests::{Sandbox, snapshot_count, unreferenced};
use nightshift_worker::Worker;
use serde_json::Value;

const TABLE: &str = "tests.sales";

fn spec(mode: &str, files: &str) -> String {
    format!(
        r#"[pipeline]
name = "sales"

[[source]]
name = "sales"
format = "csv"
location = "{files}"
[source.schema]
id = "bigint not null"

[transform]
sql = "SELECT id, region, amount FROM sales"

[target]
table = "{TABLE}"
mode = "{mode}"
partition_by = ["identity(region)"]
"#
    )
}

/// `files` CSV files of `rows` rows each under `dir`, ids from `first`.
fn write_sales(sandbox: &Sandbox, dir: &str, files: usize, rows: usize, first: usize) {
    for f in 0..files {
        let mut csv = String::from("id,region,amount\n");
        for r in 0..rows {
            let id = first + f * rows + r;
            csv.push_str(&format!("{id},région-{},{}.5\n", id % 3, id % 7));
        }
        sandbox.write(&format!("{dir}/part-{f}.csv"), csv);
    }
}

async fn run(
    sandbox: &Sandbox,
    job: &str,
) -> std::result::Result<nightshift_coordinator::JobReport, JobError> {
    sandbox.run(2, Some(3), Some(job)).await
}

/// Reads the table with every snapshot and the references; asserts both readers agree on
/// every snapshot and that every data file in the warehouse is referenced.
fn read_all(sandbox: &Sandbox, extra: &[&str]) -> Value {
    let mut args = vec!["--every-snapshot", "--references"];
    args.extend_from_slice(extra);
    let read = sandbox.read_table_with(TABLE, None, &args);
    for snapshot in read["by_snapshot"].as_array().expect("snapshots") {
        assert_eq!(
            snapshot["pyiceberg"]["checksum"], snapshot["duckdb"]["checksum"],
            "readers disagree on a snapshot: {read:#}"
        );
    }
    let files = sandbox.data_files();
    assert_eq!(
        unreferenced(&files, &read),
        Vec::<&String>::new(),
        "data files no snapshot references"
    );
    read
}

fn rows_by_snapshot(read: &Value) -> Vec<u64> {
    read["by_snapshot"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pyiceberg"]["rows"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_ids_that_share_a_prefix_keep_each_others_files() {
    let sandbox = Sandbox::new();
    write_sales(&sandbox, "data/sales", 3, 20, 0);
    sandbox.spec(&spec("append", "data/sales/*.csv"));
    // `etl` is a prefix of `etl-sales-2024`, whose files start with `etl-s1-…`; the third id
    // even contains a whole data-file name tail.
    for (i, job) in ["etl-sales-2024", "etl", "etl-s1-p0-a1-deadbeef"]
        .into_iter()
        .enumerate()
    {
        let report = run(&sandbox, job)
            .await
            .unwrap_or_else(|e| panic!("{job}: {e}"));
        assert_eq!(report.rows, 60, "{job}");
        let read = read_all(&sandbox, &[]);
        assert_eq!(snapshot_count(&read), i + 1);
        assert_eq!(read["pyiceberg"]["rows"], 60 * (i as u64 + 1), "{read:#}");
        assert_eq!(read["duckdb"]["rows"], 60 * (i as u64 + 1), "{read:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_keeps_every_file_any_snapshot_references() {
    let sandbox = Sandbox::new();
    write_sales(&sandbox, "data/day1", 3, 10, 0);
    write_sales(&sandbox, "data/day2", 2, 10, 1000);

    // Snapshot A appends day 1; snapshot B overwrites it with day 2, so A's files are
    // referenced only by the history.
    sandbox.spec(&spec("append", "data/day1/*.csv"));
    run(&sandbox, "daily-sales").await.expect("A");
    sandbox.spec(&spec("overwrite", "data/day2/*.csv"));
    run(&sandbox, "daily-sales-2").await.expect("B");
    let read = read_all(&sandbox, &[]);
    assert_eq!(rows_by_snapshot(&read), vec![30, 20]);
    let snapshot_a = read["snapshots"][0]["snapshot_id"].as_i64().unwrap();

    // A job whose id is a prefix of both fails after some of its tasks wrote files: its
    // cleanup removes its own files and nothing else.
    write_sales(&sandbox, "data/broken", 2, 10, 2000);
    sandbox.write("data/broken/part-9.csv", "id,region,amount\n,x,1.5\n");
    sandbox.spec(&spec("append", "data/broken/*.csv"));
    let err = run(&sandbox, "daily")
        .await
        .expect_err("null id fails the job");
    assert!(err.to_string().contains("column `id`"), "{err}");
    let read = read_all(&sandbox, &[]);
    assert_eq!(rows_by_snapshot(&read), vec![30, 20]);
    assert!(
        !sandbox
            .data_files()
            .iter()
            .any(|f| f.contains("/daily-s1-")),
        "{:?}",
        sandbox.data_files()
    );

    // Roll back to A, then append on top of it with yet another prefix-sharing id.
    let read = read_all(&sandbox, &["--rollback-to", &snapshot_a.to_string()]);
    assert_eq!(read["pyiceberg"]["rows"], 30);
    sandbox.spec(&spec("append", "data/day1/*.csv"));
    run(&sandbox, "daily-s").await.expect("C");
    let read = read_all(&sandbox, &[]);
    assert_eq!(rows_by_snapshot(&read), vec![30, 20, 60]);
    assert_eq!(read["pyiceberg"]["rows"], 60);
    assert_eq!(read["duckdb"]["rows"], 60);

    // Make B current again: its files are all still there.
    let snapshot_b = read["snapshots"][1]["snapshot_id"].as_i64().unwrap();
    let read = read_all(&sandbox, &["--set-current", &snapshot_b.to_string()]);
    assert_eq!(read["pyiceberg"]["rows"], 20);
    assert_eq!(read["duckdb"]["rows"], 20);
}

/// A state store whose bookkeeping after the commit fails.
struct FailingAfterCommit(MemoryState);

fn down() -> CoreError {
    CoreError::Transport("state store down".into())
}

#[async_trait]
impl StateStore for FailingAfterCommit {
    async fn set_job_state(&self, job: &JobId, state: JobState, detail: &str) -> Result<()> {
        if state == JobState::Succeeded {
            return Err(down());
        }
        self.0.set_job_state(job, state, detail).await
    }
    async fn job_state(&self, job: &JobId) -> Result<Option<(JobState, String)>> {
        self.0.job_state(job).await
    }
    async fn claim_task_output(&self, job: &JobId, task: TaskKey, result: Bytes) -> Result<bool> {
        self.0.claim_task_output(job, task, result).await
    }
    async fn task_outputs(&self, job: &JobId) -> Result<Vec<(TaskKey, Bytes)>> {
        self.0.task_outputs(job).await
    }
    async fn forget_task_outputs(&self, job: &JobId, tasks: &[TaskKey]) -> Result<()> {
        self.0.forget_task_outputs(job, tasks).await
    }
    async fn clear_task_outputs(&self, _job: &JobId) -> Result<()> {
        Err(down())
    }
    async fn next_attempts(&self, job: &JobId, tasks: &[TaskKey]) -> Result<Vec<u32>> {
        self.0.next_attempts(job, tasks).await
    }
    async fn acquire_job(
        &self,
        job: &JobId,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<bool> {
        self.0.acquire_job(job, owner, ttl).await
    }
    async fn release_job(&self, _job: &JobId, _owner: &str) -> Result<()> {
        Err(down())
    }
    async fn schedule_sweep(&self, _job: &JobId, _table: &str, _due_ms: i64) -> Result<()> {
        Err(down())
    }
    async fn due_sweeps(&self, now_ms: i64) -> Result<Vec<(JobId, String)>> {
        self.0.due_sweeps(now_ms).await
    }
    async fn sweep_done(&self, job: &JobId) -> Result<()> {
        self.0.sweep_done(job).await
    }
    async fn renew_lease(
        &self,
        job: &JobId,
        task: TaskKey,
        attempt: u32,
        worker: &str,
        ttl: std::time::Duration,
    ) -> Result<()> {
        self.0.renew_lease(job, task, attempt, worker, ttl).await
    }
    async fn lease(&self, job: &JobId, task: TaskKey) -> Result<Option<u32>> {
        self.0.lease(job, task).await
    }
    async fn request_cancel(&self, job: &JobId) -> Result<()> {
        self.0.request_cancel(job).await
    }
    async fn cancel_requested(&self, job: &JobId) -> Result<bool> {
        self.0.cancel_requested(job).await
    }
}

/// Runs `pipeline.toml` of `sandbox` as `job` on two in-process workers over `state`.
async fn run_on(
    sandbox: &Sandbox,
    state: Arc<dyn StateStore>,
    job: &str,
) -> std::result::Result<nightshift_coordinator::JobReport, JobError> {
    let spec = nightshift_spec::load_spec(&sandbox.path("pipeline.toml"), &[]).unwrap();
    let warehouse = prepare_warehouse(&sandbox.warehouse()).unwrap();
    let queue = Arc::new(MemoryQueue::default());
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let worker = Worker::new(format!("w{i}"), queue.clone(), state.clone());
            tokio::spawn(async move { worker.run().await })
        })
        .collect();
    let env = JobEnv::new(
        queue.clone(),
        state,
        embedded_catalog(&warehouse).unwrap(),
        warehouse.join(SCRATCH_DIR),
    );
    let options = JobOptions {
        job_id: JobId::parse(job).unwrap(),
        workers: 2,
        target_task_bytes: None,
        partitions: Some(3),
        max_task_attempts: None,
    };
    let report = run_job(&env, &spec, &options, &|_| {}).await;
    queue.close();
    for w in workers {
        w.await.unwrap().unwrap();
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_landed_commit_is_a_success_even_when_cleanup_fails() {
    let sandbox = Sandbox::new();
    write_sales(&sandbox, "data/sales", 2, 10, 0);
    sandbox.spec(&spec("append", "data/sales/*.csv"));
    let state = Arc::new(FailingAfterCommit(MemoryState::default()));
    let report = run_on(&sandbox, state, "nightly")
        .await
        .expect("the snapshot landed: the job succeeded");
    assert!(report.snapshot_id.is_some());
    let read = sandbox.read_table(TABLE, None);
    assert_eq!(snapshot_count(&read), 1);
    assert_eq!(read["pyiceberg"]["rows"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_found_committed_ends_succeeded() {
    let sandbox = Sandbox::new();
    write_sales(&sandbox, "data/sales", 2, 10, 0);
    sandbox.spec(&spec("append", "data/sales/*.csv"));
    let state = Arc::new(MemoryState::default());
    let first = run_on(&sandbox, state.clone(), "nightly")
        .await
        .expect("first");
    // The coordinator died right after the commit: the state still says committing.
    let job = JobId::parse("nightly").unwrap();
    state
        .set_job_state(&job, JobState::Committing, "")
        .await
        .unwrap();
    let again = run_on(&sandbox, state.clone(), "nightly")
        .await
        .expect("again");
    assert!(again.already_committed);
    assert_eq!(again.snapshot_id, first.snapshot_id);
    assert_eq!(
        state.job_state(&job).await.unwrap().map(|(s, _)| s),
        Some(JobState::Succeeded)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_is_recorded_as_cancelled() {
    let sandbox = Sandbox::new();
    write_sales(&sandbox, "data/sales", 2, 10, 0);
    sandbox.spec(&spec("append", "data/sales/*.csv"));
    let state = Arc::new(MemoryState::default());
    let job = JobId::parse("to-cancel").unwrap();
    state.request_cancel(&job).await.unwrap();
    let err = run_on(&sandbox, state.clone(), "to-cancel")
        .await
        .expect_err("cancelled");
    assert!(matches!(err, JobError::Cancelled), "{err}");
    assert_eq!(
        state.job_state(&job).await.unwrap().map(|(s, _)| s),
        Some(JobState::Cancelled)
    );
    assert!(!sandbox.read_table(TABLE, None)["exists"].as_bool().unwrap());
    assert!(
        sandbox.data_files().is_empty(),
        "{:?}",
        sandbox.data_files()
    );
}

fn spec_for(table: &str, checks: &str) -> String {
    format!(
        "[pipeline]\nname = \"nested\"\n\n[[source]]\nname = \"sales\"\nformat = \"csv\"\n\
         location = \"data/sales/*.csv\"\n\n[transform]\nsql = \"SELECT id, region, amount FROM sales\"\n\n\
         [target]\ntable = \"{table}\"\npartition_by = [\"identity(region)\"]\n{checks}"
    )
}

/// Catalogs place `a.b.c` (namespace `a.b`) inside `a.b`'s directory and `ns.t.data` inside
/// `ns.t`'s data directory. Neither a failed first run of the outer table (which drops it
/// and deletes its files), nor its job's sweep under the same job id (one id per night for
/// every pipeline is a common scheduler convention), nor orphan removal on it may delete a
/// file of the inner table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_nested_in_another_tables_directory_keeps_its_files() {
    let sandbox = Sandbox::new();
    write_sales(&sandbox, "data/sales", 2, 10, 0);
    for inner in ["a.b.c", "ns.t.data"] {
        sandbox.spec(&spec_for(inner, ""));
        run(&sandbox, "nightly-1").await.expect(inner);
    }
    let failing = "\n[[check]]\nname = \"never\"\ntype = \"row_count\"\nmax = 0\n";
    sandbox.spec(&spec_for("a.b", failing));
    let err = run(&sandbox, "nightly-1")
        .await
        .expect_err("a failing check");
    assert!(err.to_string().contains("never"), "{err}");
    sandbox.spec(&spec_for("ns.t", ""));
    run(&sandbox, "nightly-1").await.expect("ns.t");
    let warehouse = sandbox.warehouse();
    // Every file two days old: all of them are old enough for orphan removal's age.
    age_every_file(&warehouse, 2 * 86_400);
    let out = sandbox.cli(&[
        "maintain",
        "ns.t",
        "--warehouse",
        warehouse.to_str().unwrap(),
        "--remove-orphans-older-than",
        "1d",
    ]);
    assert!(out.status.success(), "{out:?}");
    for table in ["a.b.c", "ns.t.data", "ns.t"] {
        let read = sandbox.read_table(table, None);
        assert_eq!(read["pyiceberg"]["rows"], 20, "{table}: {read:#}");
        assert_eq!(read["duckdb"]["rows"], 20, "{table}: {read:#}");
    }
}

/// A partition value is one directory, escaped as Iceberg's Java writer escapes it: `/` and
/// `..` in a value cannot put a data file outside the table's data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_values_stay_inside_the_tables_data_directory() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "data/odd/part-0.csv",
        "id,region,amount\n1,../../../../escaped,1.5\n2,a/b,2.5\n3,50%,3.5\n4,é ü,4.5\n5,..,5.5\n",
    );
    sandbox.spec(&spec("append", "data/odd/*.csv"));
    let report = run(&sandbox, "odd").await.expect("odd partition values");
    assert_eq!(report.rows, 5);
    let read = read_all(&sandbox, &[]);
    assert_eq!(read["pyiceberg"]["rows"], 5, "{read:#}");
    let data = sandbox.warehouse().join("tests/sales/data");
    let mut dirs: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(
        dirs,
        [
            "region=%C3%A9+%C3%BC",
            "region=..",
            "region=..%2F..%2F..%2F..%2Fescaped",
            "region=50%25",
            "region=a%2Fb"
        ]
    );
    for dir in &dirs {
        assert_eq!(
            std::fs::read_dir(data.join(dir)).unwrap().count(),
            1,
            "{dir}"
        );
    }
    assert!(!sandbox.path("escaped").exists());
}

/// Sets the modification time of every file below `dir` to `secs` ago.
fn age_every_file(dir: &std::path::Path, secs: u64) {
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            age_every_file(&path, secs);
        } else {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(then)
                .unwrap();
        }
    }
}

/// A snapshot never names a file that is gone: a data file deleted while its job runs (in
/// life by orphan removal, or by the cleanup of another run under the same job id; here
/// while the job waits before its commit) fails the commit, and nothing is committed.
#[test]
fn a_data_file_deleted_before_the_commit_fails_the_job_and_nothing_is_committed() {
    let sandbox = Sandbox::new();
    write_sales(&sandbox, "data/sales", 2, 10, 0);
    sandbox.spec(&spec("append", "data/sales/"));
    let warehouse = sandbox.warehouse();
    let child = spawn_run(&sandbox, "gone-1", "coordinator-before-commit=sleep(5000)");
    let started = std::time::Instant::now();
    let victim = loop {
        if let Some(file) = sandbox
            .data_files()
            .into_iter()
            .find(|f| f.contains("/gone-1-"))
        {
            break file;
        }
        assert!(started.elapsed().as_secs() < 60, "the job wrote no file");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // The tasks of 20 rows are done well within the failpoint's wait before the commit.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::fs::remove_file(warehouse.join(&victim)).expect("delete a data file of the job");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("are gone before its commit"), "{stderr}");
    assert_eq!(snapshot_count(&sandbox.read_table(TABLE, None)), 0);
}

/// A task that panics (a library's overflow on a sentinel date did) fails its job with the
/// panic's message, nothing committed; the run used to wait for the task's result forever.
#[test]
fn a_task_that_panics_fails_the_job_instead_of_hanging_it() {
    let sandbox = Sandbox::new();
    write_sales(&sandbox, "data/sales", 2, 10, 0);
    sandbox.spec(&spec("append", "data/sales/"));
    let mut child = spawn_run(&sandbox, "panics-1", "worker-task-panic=return");
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed().as_secs() > 60 {
            let _ = child.kill();
            panic!("the run still waits a minute after its task panicked");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the task panicked: failpoint worker-task-panic"),
        "{stderr}"
    );
    assert_eq!(snapshot_count(&sandbox.read_table(TABLE, None)), 0);
}

/// A task that keeps its thread busy for longer than the 30 s task lease (a large in-memory
/// sort does) is not taken for a dead worker's: the run commits every row. It used to fail
/// with "its worker stopped renewing the task lease".
#[test]
fn a_task_that_holds_its_thread_past_the_lease_still_commits() {
    let sandbox = Sandbox::new();
    write_sales(&sandbox, "data/sales", 2, 10, 0);
    sandbox.spec(&spec("append", "data/sales/"));
    let out = spawn_run(
        &sandbox,
        "holds-1",
        "worker-task-hold-thread=1*return(35000)",
    )
    .wait_with_output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let table = sandbox.read_table(TABLE, None);
    assert_eq!(snapshot_count(&table), 1);
    assert_eq!(table["pyiceberg"]["rows"], 20, "{table:#}");
    assert_eq!(table["duckdb"]["rows"], 20, "{table:#}");
}

/// `nightshift run pipeline.toml --job-id JOB` on the sandbox's warehouse with `failpoints`,
/// in the background, its output piped.
fn spawn_run(sandbox: &Sandbox, job: &str, failpoints: &str) -> std::process::Child {
    std::process::Command::new(nightshift_tests::nightshift_bin())
        .args(["run", "pipeline.toml", "--job-id", job, "--warehouse"])
        .arg(sandbox.warehouse())
        .current_dir(sandbox.path(""))
        .env("FAILPOINTS", failpoints)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nightshift")
}
