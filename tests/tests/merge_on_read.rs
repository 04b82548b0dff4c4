//! Iceberg sources written merge-on-read by another engine: DuckDB deletes and updates rows
//! of a table in the REST catalog by writing position delete files, and the cluster's
//! workers read that table with the deletes applied, as DuckDB and PyIceberg read it.

use std::process::Command;

use nightshift_tests::cluster::{ClusterSandbox, ClusterStorage, Seaweed};
use nightshift_tests::{json_output, python, snapshot_count};
use serde_json::Value;

const UPSTREAM: &str = "upstream.orders";

/// Writes the upstream table with DuckDB; returns its planned files as PyIceberg sees them.
fn write_upstream(seaweed: &Seaweed) -> Value {
    duckdb_on(seaweed, UPSTREAM, &[])
}

/// Runs the DuckDB script on `table` of the REST catalog (with `extra` arguments); returns
/// the table's planned files as PyIceberg sees them.
fn duckdb_on(seaweed: &Seaweed, table: &str, extra: &[&str]) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/merge_on_read.py"))
        .arg(&seaweed.rest_uri)
        .arg(&seaweed.s3_endpoint)
        .arg(format!("s3://{}/", seaweed.table_bucket))
        .arg(table)
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", &seaweed.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &seaweed.secret_key);
    json_output(cmd)
}

fn spec(sql: &str, target: &str) -> String {
    format!(
        r#"[pipeline]
name = "copy_orders"

[[source]]
name = "orders"
format = "iceberg"
table = "{UPSTREAM}"

[transform]
sql = "{sql}"

[target]
table = "{target}"
mode = "overwrite"
"#
    )
}

fn succeeded(cluster: &ClusterSandbox, job: &str) {
    let outcome = cluster.submit(job, &[]);
    assert_eq!(
        outcome["status"],
        "succeeded",
        "{outcome}\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_on_read_source_is_read_with_its_deletes_applied() {
    let seaweed = Seaweed::start();
    let planned = write_upstream(&seaweed);
    let files = planned["files"].as_array().expect("files");
    let with_deletes = files
        .iter()
        .filter(|f| !f["deletes"].as_array().unwrap().is_empty())
        .count();
    assert!(
        with_deletes >= 2 && with_deletes < files.len(),
        "the fixture should give data files with and without deletes: {planned:#}"
    );

    let cluster = ClusterSandbox::start(seaweed.with_rest_catalog(), 2, &[]);
    assert!(matches!(cluster.storage, ClusterStorage::S3 { .. }));
    cluster
        .sandbox
        .spec(&spec("SELECT * FROM orders", "tests.orders_copy"));
    succeeded(&cluster, "copy-1");

    // Deleted ids are gone, updated rows appear once with their new values, and the last
    // insert (no delete applies to it) is read as plain Parquet beside them.
    let expected = (1..=3000).filter(|i| i % 7 != 0).count() + 500;
    let source = cluster.read_table(UPSTREAM, None);
    let copy = cluster.read_table("tests.orders_copy", None);
    assert_eq!(snapshot_count(&copy), 1, "{copy:#}");
    for read in [&source, &copy] {
        for reader in ["pyiceberg", "duckdb"] {
            assert_eq!(read[reader]["rows"], expected, "{reader}: {read:#}");
            assert_eq!(
                read[reader]["checksum"], source["duckdb"]["checksum"],
                "{reader} differs from DuckDB's read of the source: {read:#}"
            );
        }
    }

    // A count reads no column of the files, and still only the rows left.
    cluster.sandbox.spec(&spec(
        "SELECT COUNT(*) AS n, SUM(amount) AS total, COUNT(*) FILTER (WHERE note = 'réglé ✓') AS updated FROM orders",
        "tests.orders_count",
    ));
    succeeded(&cluster, "count-1");
    let counted = cluster.read_table("tests.orders_count", None);
    let total: f64 = (1..=3000)
        .filter(|i| i % 7 != 0 && *i != 5 && *i != 2005)
        .map(|i| i as f64 * 1.5)
        .sum::<f64>()
        - 2.0
        + (3001..3501).map(|i| i as f64 * 0.5).sum::<f64>();
    let row: Value =
        serde_json::from_str(counted["pyiceberg"]["first"][0].as_str().expect("one row"))
            .expect("a canonical row");
    assert_eq!(row[0], expected, "{counted:#}");
    let summed: f64 = row[1].as_str().expect("a float").parse().expect("a float");
    assert!(
        (summed - total).abs() < 1e-6,
        "{summed} != {total}: {counted:#}"
    );
    assert_eq!(row[2], 2, "{counted:#}");

    // DuckDB deletes rows of the table Nightshift wrote (position delete files in our
    // table); then a merge updates ids up to 100. The files it rewrites are read with those
    // deletes applied: no deleted row comes back, except the ids the merge itself brings.
    let planned = duckdb_on(
        &seaweed,
        "tests.orders_copy",
        &["--run", "DELETE FROM {table} WHERE id % 5 = 0"],
    );
    assert!(
        planned["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| !f["deletes"].as_array().unwrap().is_empty()),
        "{planned:#}"
    );
    cluster.sandbox.spec(
        &spec(
            "SELECT id, region, amount + 1000 AS amount, note FROM orders WHERE id <= 100",
            "tests.orders_copy",
        )
        .replace(
            "mode = \"overwrite\"",
            "mode = \"merge\"\nmerge_keys = [\"id\"]",
        ),
    );
    succeeded(&cluster, "merge-1");
    let upstream_ids = || {
        (1..=3000)
            .filter(|i| i % 7 != 0)
            .chain(3001..3501)
            .collect::<Vec<i64>>()
    };
    let kept = upstream_ids()
        .into_iter()
        .filter(|i| i % 5 != 0 || *i <= 100)
        .count();
    let merged = cluster.read_table("tests.orders_copy", None);
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(merged[reader]["rows"], kept, "{reader}: {merged:#}");
    }
    assert_eq!(
        merged["pyiceberg"]["checksum"], merged["duckdb"]["checksum"],
        "{merged:#}"
    );
}
