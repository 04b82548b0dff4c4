//! A partitioned write under a memory limit: rows sorted by day within each task leave one
//! file per day however many days a task writes (and one per year and region when
//! partitioned by both), and a bucket spec (whose rows cannot be
//! sorted into buckets) closes files to stay within the limit instead of holding one open
//! per bucket. Both give the rows of an unlimited run.

use datafusion::prelude::SessionContext;
use nightshift::embedded::EmbeddedOptions;
use nightshift_coordinator::JobReport;
use nightshift_core::session::MemorySettings;
use nightshift_tests::Sandbox;

/// `events` as 3 Parquet files of 20,000 rows: 400 days in a scattered order (so every
/// task meets every one of its days throughout its input), an id, an amount, unicode labels
/// (13 and 300 values) and a null amount in every 97th row.
async fn write_events(sandbox: &Sandbox) {
    let ctx = SessionContext::new();
    std::fs::create_dir_all(sandbox.path("data/events")).unwrap();
    for part in 0..3 {
        let sql = format!(
            "SELECT CAST(v AS BIGINT) AS id, \
                    CAST(DATE '2024-01-01' + CAST((v * 7919) % 400 AS INT) AS DATE) AS day, \
                    CASE WHEN v % 97 = 0 THEN NULL ELSE CAST(v % 1000 AS DOUBLE) END AS amount, \
                    concat('größe-', CAST(v % 13 AS VARCHAR)) AS label, \
                    concat('région-', CAST(v % 300 AS VARCHAR)) AS region \
             FROM generate_series({}, {}) AS t(v)",
            part * 20_000,
            part * 20_000 + 19_999
        );
        let batches = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        nightshift_tests::write_parquet(
            &sandbox.path(&format!("data/events/part-{part}.parquet")),
            &batches,
        );
    }
}

fn spec(partition_by: &str) -> String {
    format!(
        r#"[pipeline]
name = "events_by_day"

[[source]]
name = "events"
format = "parquet"
location = "data/events/"

[transform]
sql = "SELECT id, day, amount, label, region FROM events"

[target]
table = "tests.events"
mode = "overwrite"
partition_by = [{partition_by}]
"#
    )
}

/// Runs the sandbox's spec unlimited, then under `limit` bytes for two tasks; checks both
/// wrote the same rows and returns the limited run's report.
async fn limited_matches_unlimited(sandbox: &Sandbox, limit: u64) -> JobReport {
    let unlimited = sandbox.run(2, Some(2), None).await.expect("unlimited");
    let unlimited_read = sandbox.read_table("tests.events", None);

    let mut embedded = EmbeddedOptions::new(sandbox.warehouse(), 2);
    embedded.memory = MemorySettings::new(Some(limit), Some(sandbox.path("spill")), 2);
    let limited = sandbox
        .run_embedded(embedded, Some(2), None, &[])
        .await
        .expect("a limited run closes files rather than fails");
    let limited_read = sandbox.read_table("tests.events", None);
    assert_eq!(limited.rows, 60_000);
    assert_eq!(limited.rows, unlimited.rows);
    assert_eq!(
        limited_read["duckdb"]["checksum"],
        unlimited_read["duckdb"]["checksum"]
    );
    assert_eq!(limited_read["duckdb"]["rows"], 60_000);
    limited
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_day_under_a_small_limit_leaves_one_file_per_day() {
    let sandbox = Sandbox::new();
    write_events(&sandbox).await;
    sandbox.spec(&spec("\"day(day)\""));
    // Each task writes about 200 days. Held open together they would need far more than
    // the limit (an open Parquet writer alone holds about half a MiB), and a writer that
    // must close files to fit leaves several files in a day.
    let report = limited_matches_unlimited(&sandbox, 16 << 20).await;
    assert_eq!(report.partitions, 400);
    assert_eq!(report.max_files_per_partition, 1, "{report:?}");
    assert_eq!(report.files, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_year_and_region_under_a_small_limit_leaves_one_file_per_partition() {
    let sandbox = Sandbox::new();
    write_events(&sandbox).await;
    sandbox.spec(&spec("\"year(day)\", \"region\""));
    // 2 years, 300 regions. Rows sorted by day, then region, would meet most of a
    // year's regions in every slice of it: about 150 files open at once in each task, more
    // than the limit holds, and files closed to fit (or missed by a slice) would leave
    // several in a partition. Sorted by year, then region, each partition's rows come
    // together.
    let report = limited_matches_unlimited(&sandbox, 16 << 20).await;
    // Every region in 2024; in the 34 days of 2025, those its rows meet.
    assert!(report.partitions > 300, "{report:?}");
    assert_eq!(report.max_files_per_partition, 1, "{report:?}");
    assert_eq!(report.files, report.partitions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_bucket_under_a_small_limit_closes_files_to_stay_within_it() {
    let sandbox = Sandbox::new();
    write_events(&sandbox).await;
    sandbox.spec(&spec("\"bucket(64, id)\""));
    // Rows are distributed by `id`, so both tasks meet every bucket: at most 2 files each.
    let unlimited = sandbox.run(2, Some(2), None).await.expect("unlimited");
    assert_eq!(unlimited.partitions, 64);
    assert!(unlimited.files <= 128, "{unlimited:?}");
    // 64 buckets open at once in each task hold more than its share of 16 MiB: the writer
    // closes the files it wrote least recently and opens new ones as their rows come.
    let limited = limited_matches_unlimited(&sandbox, 16 << 20).await;
    assert_eq!(limited.partitions, 64);
    assert!(limited.files > unlimited.files, "{limited:?}");
}

/// Partition columns whose names are no Avro names (`Région`, `1day`) get partition fields
/// named as Iceberg's Java writer names them in Avro (`R_xE9gion`, `_1day_month`): the
/// manifests stay readable, so a second run appends and both readers read every row (the
/// first run used to write manifests that DuckDB, and every later run, failed to read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_columns_named_outside_avro_names_keep_the_table_readable() {
    let sandbox = Sandbox::new();
    write_events(&sandbox).await;
    sandbox.spec(
        r#"[pipeline]
name = "unicode_partitions"

[[source]]
name = "events"
format = "parquet"
location = "data/events/"

[transform]
sql = 'SELECT id, day AS "1day", region AS "Région" FROM events WHERE id % 100 = 0'

[target]
table = "tests.unicode"
mode = "append"
partition_by = ["identity(Région)", "month(1day)"]
"#,
    );
    for job in ["first", "second"] {
        sandbox.run(2, Some(2), Some(job)).await.expect(job);
    }
    let read = sandbox.read_table("tests.unicode", None);
    assert_eq!(read["pyiceberg"]["rows"], 1200, "{read:#}");
    assert_eq!(read["duckdb"]["rows"], 1200, "{read:#}");
    assert_eq!(read["pyiceberg"]["checksum"], read["duckdb"]["checksum"]);
    let files = sandbox.data_files();
    assert!(
        files
            .iter()
            .all(|f| f.contains("/R_xE9gion=r%C3%A9gion-") && f.contains("/_1day_month=")),
        "{files:?}"
    );
}

/// Partition values that directory names escape (`:` as `%3A`, `é`, `%`) are written and
/// read back, and a failed run's files in such directories are swept: the sweep deleted
/// names that did not exist (the key's `%3A` was decoded to `:`), so every failed run's
/// files in such partitions stayed. A zoned timestamp before 1970 with a fraction of a
/// second, which iceberg-rust cannot name (the task panicked), fails by column and value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_partition_values_are_written_and_a_failed_runs_files_are_swept() {
    let sandbox = Sandbox::new();
    std::fs::create_dir_all(sandbox.path("data")).unwrap();
    write_stamped(
        &sandbox,
        vec![-1_000_000, 0, 1_710_045_000_123_456, 86_400_000_000],
    );
    let spec = |checks: &str| {
        format!(
            r#"[pipeline]
name = "escaped"

[[source]]
name = "src"
format = "parquet"
location = "data/in.parquet"

[transform]
sql = "SELECT id, ts, city FROM src"

[target]
table = "tests.escaped"
partition_by = ["identity(ts)", "identity(city)"]
{checks}"#
        )
    };
    sandbox.spec(&spec(""));
    sandbox
        .run(2, Some(2), Some("first"))
        .await
        .expect("first run");
    let read = sandbox.read_table("tests.escaped", None);
    assert_eq!(read["pyiceberg"]["rows"], 4, "{read:#}");
    assert_eq!(read["duckdb"]["rows"], 4, "{read:#}");
    let committed = sandbox.data_files();
    assert_eq!(committed.len(), 4, "{committed:?}");
    assert!(
        committed
            .iter()
            .any(|f| f.contains("ts=1969-12-31+23%3A59%3A59+UTC/city=Z%C3%BCrich/")),
        "{committed:?}"
    );

    // A run whose check fails after its tasks wrote: its files go, the first run's stay.
    sandbox.spec(&spec(
        "\n[[check]]\nname = \"never\"\ntype = \"row_count\"\nmax = 0\n",
    ));
    let err = sandbox
        .run(2, Some(2), Some("second"))
        .await
        .expect_err("the check fails");
    assert!(err.to_string().contains("never"), "{err}");
    assert_eq!(sandbox.data_files(), committed);

    // Half a second before the epoch, with zone: refused by name, nothing left behind.
    write_stamped(&sandbox, vec![-500_000, 0, 1, 2]);
    sandbox.spec(&spec(""));
    let err = sandbox
        .run(2, Some(2), Some("third"))
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains(
            "column `ts`: the value 1969-12-31T23:59:59.500Z cannot be an identity partition value"
        ),
        "{err}"
    );
    assert_eq!(sandbox.data_files(), committed);
}

/// `data/in.parquet`: ids 1.., timestamps with zone (microseconds `ts`), and cities whose
/// names a directory escapes.
fn write_stamped(sandbox: &Sandbox, ts: Vec<i64>) {
    use datafusion::arrow::array::{
        ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    };
    use std::sync::Arc;
    let cities = ["Zürich", "a:b", "50%", "São Paulo"];
    let batch = RecordBatch::try_from_iter([
        (
            "id",
            Arc::new(Int64Array::from_iter_values(1..=ts.len() as i64)) as ArrayRef,
        ),
        (
            "city",
            Arc::new(StringArray::from_iter_values(
                cities.iter().cycle().take(ts.len()),
            )) as ArrayRef,
        ),
        (
            "ts",
            Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")) as ArrayRef,
        ),
    ])
    .unwrap();
    nightshift_tests::write_parquet(&sandbox.path("data/in.parquet"), &[batch]);
}
