//! The commit contract: one snapshot per job, never two, nothing on failure; every type
//! readable by PyIceberg and DuckDB.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, Int32Array, Int64Array, RecordBatch,
    StringArray, TimestampMicrosecondArray,
};
use async_trait::async_trait;
use bytes::Bytes;
use nightshift::embedded::{EmbeddedOptions, SCRATCH_DIR, embedded_catalog, prepare_warehouse};
use nightshift_coordinator::cleanup::run_late_sweeps;
use nightshift_coordinator::{JobEnv, JobEvent, JobOptions, run_job};
use nightshift_core::ids::JobId;
use nightshift_core::transport::memory::{MemoryQueue, MemoryState};
use nightshift_core::transport::{Delivery, TaskQueue};
use nightshift_tests::{RefSource, Sandbox, assert_matches_reference, snapshot_count};
use nightshift_worker::Worker;

fn csv_spec(extra: &str) -> String {
    format!(
        r#"[pipeline]
name = "events"

[params]
run_date = "2024-05-01"

[[source]]
name = "events"
format = "csv"
location = "data/events/*.csv"
[source.schema]
id = "bigint not null"
amount = "decimal(10, 2)"

[transform]
sql = "SELECT id, kind, amount, DATE '${{run_date}}' AS run_date FROM events"

[target]
table = "tests.events"
{extra}"#
    )
}

fn write_events(sandbox: &Sandbox, files: usize, rows_per_file: usize) {
    for f in 0..files {
        let mut csv = String::from("id,kind,amount\n");
        for r in 0..rows_per_file {
            csv.push_str(&format!(
                "{},kind{},{}.{:02}\n",
                f * 1000 + r,
                r % 3,
                r,
                r % 100
            ));
        }
        sandbox.write(&format!("data/events/part-{f}.csv"), csv);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_job_id_commits_once() {
    let sandbox = Sandbox::new();
    write_events(&sandbox, 3, 20);
    sandbox.spec(&csv_spec(""));
    let first = sandbox
        .run(2, Some(3), Some("nightly-2024-05-01"))
        .await
        .expect("first run");
    assert!(!first.already_committed);
    let files = sandbox.warehouse_files();
    let again = sandbox
        .run(4, Some(3), Some("nightly-2024-05-01"))
        .await
        .expect("second run");
    assert!(again.already_committed, "{again:?}");
    assert_eq!(again.snapshot_id, first.snapshot_id);
    // It reports what the commit it found put in the table, not the nothing it did.
    assert_eq!(
        (again.rows, again.files, again.bytes),
        (60, first.files, first.bytes),
        "{again:?}"
    );
    assert_eq!(
        sandbox.warehouse_files(),
        files,
        "a re-run must write nothing"
    );
    let read = sandbox.read_table("tests.events", None);
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
    assert_eq!(read["pyiceberg"]["rows"], 60);
    let summary = &read["snapshots"][0]["summary"];
    assert_eq!(summary["nightshift.job-id"], "nightly-2024-05-01");
    assert_eq!(summary["nightshift.pipeline"], "events");
    assert_eq!(summary["nightshift.param.run_date"], "2024-05-01");

    // Another job id appends a second snapshot.
    let other = sandbox
        .run_with(
            2,
            Some(3),
            Some("nightly-2024-05-02"),
            &[("run_date", "2024-05-02")],
        )
        .await
        .expect("next day");
    assert_ne!(other.snapshot_id, first.snapshot_id);
    let read = sandbox.read_table("tests.events", None);
    assert_eq!(snapshot_count(&read), 2);
    assert_eq!(read["pyiceberg"]["rows"], 120);
    assert_eq!(read["duckdb"]["rows"], 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_job_commits_nothing_and_leaves_no_files() {
    let sandbox = Sandbox::new();
    write_events(&sandbox, 4, 10);
    sandbox.spec(&csv_spec(""));
    sandbox.run(1, Some(4), None).await.expect("good run");
    let before = sandbox.warehouse_files();

    // The last file breaks the contract: with one worker the first three tasks write their
    // data files before the fourth fails, so the failure has files to clean up.
    sandbox.write(
        "data/events/part-9.csv",
        "id,kind,amount\n1,a,1.00\n,b,2.00\n",
    );
    let finished = AtomicUsize::new(0);
    let spec = nightshift_spec::load_spec(&sandbox.path("pipeline.toml"), &[]).unwrap();
    let options = JobOptions {
        job_id: JobId::generate(),
        workers: 1,
        target_task_bytes: None,
        partitions: Some(5),
        max_task_attempts: None,
    };
    let embedded = EmbeddedOptions::new(sandbox.warehouse(), 1);
    let on_event = |e: JobEvent| {
        if let JobEvent::TaskFinished { done, .. } = e {
            finished.store(done, Ordering::SeqCst);
        }
    };
    let err = nightshift::embedded::run_embedded(&spec, &embedded, &options, &on_event)
        .await
        .expect_err("null id must fail the job")
        .to_string();
    assert!(
        err.contains("column `id`") && err.contains("part-9.csv"),
        "{err}"
    );
    assert!(
        finished.load(Ordering::SeqCst) >= 1,
        "no task wrote files before the failure"
    );
    assert_eq!(
        sandbox.warehouse_files(),
        before,
        "files left behind by the failed job"
    );
    let read = sandbox.read_table("tests.events", None);
    assert_eq!(snapshot_count(&read), 1);
    assert_eq!(read["pyiceberg"]["rows"], 40);
}

/// A queue that delivers every task twice, as a broker may after a lost ack.
struct DuplicatingQueue(MemoryQueue);

#[async_trait]
impl TaskQueue for DuplicatingQueue {
    async fn publish_task(&self, task: Bytes) -> nightshift_core::Result<()> {
        self.0.publish_task(task.clone()).await?;
        self.0.publish_task(task).await
    }
    async fn next_task(&self) -> nightshift_core::Result<Option<Box<dyn Delivery>>> {
        self.0.next_task().await
    }
    async fn open_results(&self, job: &JobId) -> nightshift_core::Result<()> {
        self.0.open_results(job).await
    }
    async fn publish_result(&self, job: &JobId, result: Bytes) -> nightshift_core::Result<()> {
        self.0.publish_result(job, result).await
    }
    async fn next_result(&self, job: &JobId) -> nightshift_core::Result<Option<Box<dyn Delivery>>> {
        self.0.next_result(job).await
    }
    async fn close_results(&self, job: &JobId) -> nightshift_core::Result<()> {
        self.0.close_results(job).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_task_deliveries_write_no_duplicate_rows() {
    let sandbox = Sandbox::new();
    write_events(&sandbox, 4, 25);
    sandbox.spec(&csv_spec("partition_by = [\"identity(kind)\"]"));
    let spec = nightshift_spec::load_spec(&sandbox.path("pipeline.toml"), &[]).unwrap();
    let warehouse = prepare_warehouse(&sandbox.warehouse()).unwrap();
    let queue = Arc::new(DuplicatingQueue(MemoryQueue::default()));
    let state = Arc::new(MemoryState::default());
    let workers: Vec<_> = (0..3)
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
    // `JobEnv::new` plans in stages: duplicate deliveries need tasks that can run twice
    // (shuffle objects, not one shared in-process plan).
    let options = JobOptions {
        job_id: JobId::generate(),
        workers: 3,
        target_task_bytes: None,
        partitions: Some(4),
        max_task_attempts: None,
    };
    let report = run_job(&env, &spec, &options, &|_| {}).await.expect("job");
    // Let the duplicate deliveries still queued finish, then close.
    while queue.0.pending_tasks() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    queue.0.close();
    for w in workers {
        w.await.unwrap().unwrap();
    }
    assert_eq!(report.rows, 100);
    let read = sandbox.read_table("tests.events", None);
    assert_eq!(read["pyiceberg"]["rows"], 100, "{read:#}");
    assert_eq!(read["duckdb"]["rows"], 100);
    let committed: usize = read["snapshots"][0]["summary"]["added-data-files"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Data files of losing duplicates that finished before the commit were swept; those
    // that finished after it were deleted by their workers (the job had ended) or by the
    // late sweep: the table directory holds exactly the committed files.
    run_late_sweeps(&env, i64::MAX).await.unwrap();
    assert_eq!(
        sandbox.data_files().len(),
        committed,
        "{:#?}",
        sandbox.data_files()
    );
}

fn typed_batch() -> RecordBatch {
    let ts = |s: &str| chrono_like_micros(s);
    RecordBatch::try_from_iter(vec![
        (
            "id",
            Arc::new(Int64Array::from(vec![1, 2, 3, 4, i64::MAX])) as ArrayRef,
        ),
        (
            "small",
            Arc::new(Int32Array::from(vec![
                Some(-7),
                None,
                Some(0),
                Some(i32::MIN),
                Some(42),
            ])) as ArrayRef,
        ),
        (
            "amount",
            Arc::new(
                Decimal128Array::from(vec![
                    Some(12345),
                    Some(-1),
                    None,
                    Some(99_999_999_999),
                    Some(0),
                ])
                .with_precision_and_scale(12, 2)
                .unwrap(),
            ) as ArrayRef,
        ),
        (
            "city",
            Arc::new(StringArray::from(vec![
                Some("Zürich"),
                Some("東京"),
                None,
                Some("emoji 🌙"),
                Some(""),
            ])) as ArrayRef,
        ),
        (
            "day",
            Arc::new(Date32Array::from(vec![
                Some(19_000),
                Some(0),
                None,
                Some(-365),
                Some(20_000),
            ])) as ArrayRef,
        ),
        (
            "ts",
            Arc::new(
                TimestampMicrosecondArray::from(vec![
                    Some(ts("2024-05-01T23:59:59.123456")),
                    Some(ts("2024-05-02T00:00:00")),
                    None,
                    Some(ts("1999-12-31T12:00:00")),
                    Some(ts("2024-05-01T00:00:00.000001")),
                ])
                .with_timezone("UTC"),
            ) as ArrayRef,
        ),
        (
            "flag",
            Arc::new(BooleanArray::from(vec![
                Some(true),
                Some(false),
                None,
                Some(true),
                Some(false),
            ])) as ArrayRef,
        ),
    ])
    .unwrap()
}

/// Microseconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.ffffff]` in UTC.
fn chrono_like_micros(s: &str) -> i64 {
    let (date, time) = s.split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|p| p.parse().unwrap()).collect();
    let micros: i64 = format!("{frac:0<6}").parse().unwrap();
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1_000_000) + micros
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_types_read_back_by_pyiceberg_and_duckdb() {
    let sandbox = Sandbox::new();
    let batch = typed_batch();
    nightshift::example_data::write_parquet(&sandbox.path("data/typed.parquet"), &batch)
        .unwrap_or_else(|_| {
            std::fs::create_dir_all(sandbox.path("data")).unwrap();
            nightshift::example_data::write_parquet(&sandbox.path("data/typed.parquet"), &batch)
                .unwrap()
        });
    let sql = "SELECT id, small, amount, city, day, ts, flag, amount * 2 AS doubled FROM typed";
    sandbox.spec(&format!(
        "[pipeline]\nname = \"types\"\n[[source]]\nname = \"typed\"\nformat = \"parquet\"\nlocation = \"data/typed.parquet\"\n\
         [transform]\nsql = \"{sql}\"\n[target]\ntable = \"tests.typed\"\npartition_by = [\"day(ts)\", \"identity(flag)\"]\n"
    ));
    let report = sandbox.run(2, Some(2), None).await.expect("types run");
    assert_eq!(report.rows, 5);
    let reference = sandbox
        .reference(sql, &[RefSource::Parquet("typed", "data/typed.parquet")])
        .await;
    let read = sandbox.read_table("tests.typed", Some(&reference));
    assert_eq!(assert_matches_reference(&read), 5);
    let first = read["pyiceberg"]["first"].to_string();
    assert!(
        first.contains("Zürich") || read.to_string().contains("Zürich"),
        "{read:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iceberg_source_reads_the_current_snapshot() {
    let sandbox = Sandbox::new();
    write_events(&sandbox, 3, 30);
    sandbox.spec(&csv_spec(""));
    sandbox.run(2, Some(3), None).await.expect("publish events");
    sandbox
        .run_with(2, Some(3), None, &[("run_date", "2024-05-02")])
        .await
        .expect("second day");

    let sql = "SELECT kind, run_date, COUNT(*) AS n, SUM(amount) AS total FROM events GROUP BY kind, run_date";
    sandbox.spec(&format!(
        "[pipeline]\nname = \"rollup\"\n[[source]]\nname = \"events\"\nformat = \"iceberg\"\ntable = \"tests.events\"\n\
         [source.schema]\nid = \"bigint\"\n[transform]\nsql = \"{sql}\"\n[target]\ntable = \"tests.rollup\"\n"
    ));
    let report = sandbox
        .run(2, Some(2), None)
        .await
        .expect("rollup from iceberg");
    assert_eq!(report.rows, 6, "3 kinds × 2 days: {report:?}");
    let read = sandbox.read_table("tests.rollup", None);
    let rows = read["pyiceberg"]["first"].to_string();
    assert!(
        rows.contains("\\\"kind0\\\", \\\"2024-05-01\\\", 30"),
        "{read:#}"
    );
    assert_eq!(read["duckdb"]["checksum"], read["pyiceberg"]["checksum"]);

    sandbox.spec(&format!(
        "[pipeline]\nname = \"rollup\"\n[[source]]\nname = \"events\"\nformat = \"iceberg\"\ntable = \"tests.nope\"\n\
         [transform]\nsql = \"{sql}\"\n[target]\ntable = \"tests.rollup\"\n"
    ));
    let err = sandbox
        .run(1, None, None)
        .await
        .expect_err("missing table")
        .to_string();
    assert!(
        err.contains("source `events`") && err.contains("`tests.nope` does not exist"),
        "{err}"
    );
}
