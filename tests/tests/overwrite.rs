//! `mode = "overwrite"`: each run replaces every row of the table with its result, as one
//! snapshot that PyIceberg and DuckDB read; appends after it and re-runs of it behave.

use arrow::datatypes::{DataType, Field, Schema};
use nightshift_tests::{RefSource, Sandbox, assert_matches_reference, snapshot_count};
use std::sync::Arc;

const SQL: &str = "SELECT id, kind, amount FROM events";

fn spec(mode: &str) -> String {
    format!(
        r#"[pipeline]
name = "events"

[[source]]
name = "events"
format = "csv"
location = "data/events/*.csv"
[source.schema]
id = "bigint not null"
kind = "varchar"
amount = "decimal(10, 2)"

[transform]
sql = "{SQL}"

[target]
table = "tests.events"
mode = "{mode}"
partition_by = ["identity(kind)"]
"#
    )
}

/// Replaces `data/events/` with `files` files of `rows` rows, ids starting at `first`.
fn write_events(sandbox: &Sandbox, first: usize, files: usize, rows: usize) {
    let _ = std::fs::remove_dir_all(sandbox.path("data/events"));
    for f in 0..files {
        let mut csv = String::from("id,kind,amount\n");
        for r in 0..rows {
            let id = first + f * rows + r;
            csv.push_str(&format!("{id},kind{},{}.{:02}\n", id % 3, r, id % 100));
        }
        sandbox.write(&format!("data/events/part-{f}.csv"), csv);
    }
}

async fn reference(sandbox: &Sandbox) -> std::path::PathBuf {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("kind", DataType::Utf8, true),
        Field::new("amount", DataType::Decimal128(10, 2), true),
    ]));
    sandbox
        .reference(SQL, &[RefSource::Csv("events", "data/events/", schema)])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_replaces_every_row_and_appends_follow() {
    let sandbox = Sandbox::new();
    sandbox.spec(&spec("overwrite"));

    write_events(&sandbox, 0, 3, 20);
    let first = sandbox.run(2, Some(3), Some("day-1")).await.expect("day 1");
    let read = sandbox.read_table("tests.events", Some(&reference(&sandbox).await));
    assert_eq!(assert_matches_reference(&read), 60);
    assert_eq!(read["snapshots"][0]["operation"], "append", "{read:#}");

    // The next day's result replaces the table's rows (different ids, fewer rows).
    write_events(&sandbox, 1000, 2, 15);
    let second = sandbox.run(4, Some(2), Some("day-2")).await.expect("day 2");
    assert_ne!(second.snapshot_id, first.snapshot_id);
    let read = sandbox.read_table("tests.events", Some(&reference(&sandbox).await));
    assert_eq!(assert_matches_reference(&read), 30);
    assert_eq!(snapshot_count(&read), 2, "{read:#}");
    let overwrite = &read["snapshots"][1];
    assert_eq!(overwrite["operation"], "overwrite", "{read:#}");
    assert_eq!(overwrite["summary"]["nightshift.job-id"], "day-2");
    assert_eq!(overwrite["summary"]["deleted-records"], "60");
    assert_eq!(overwrite["summary"]["total-records"], "30");
    assert_eq!(overwrite["summary"]["added-records"], "30");

    // A re-run of the same job id changes nothing.
    let files = sandbox.warehouse_files();
    let again = sandbox
        .run(2, Some(2), Some("day-2"))
        .await
        .expect("re-run");
    assert!(again.already_committed);
    assert_eq!(again.snapshot_id, second.snapshot_id);
    assert_eq!(
        sandbox.warehouse_files(),
        files,
        "a re-run must write nothing"
    );

    // An append after the overwrite adds to its rows; the replaced rows stay gone.
    sandbox.spec(&spec("append"));
    sandbox
        .run(2, Some(2), Some("day-2-extra"))
        .await
        .expect("append");
    let read = sandbox.read_table("tests.events", None);
    assert_eq!(read["pyiceberg"]["rows"], 60, "{read:#}");
    assert_eq!(read["duckdb"]["rows"], 60, "{read:#}");
    assert_eq!(
        read["pyiceberg"]["checksum"], read["duckdb"]["checksum"],
        "{read:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_with_an_empty_result_empties_the_table() {
    let sandbox = Sandbox::new();
    sandbox.spec(&spec("overwrite"));
    write_events(&sandbox, 0, 2, 10);
    sandbox.run(2, Some(2), None).await.expect("first run");

    write_events(&sandbox, 0, 1, 0); // header only
    let report = sandbox.run(2, Some(2), None).await.expect("empty run");
    assert!(report.snapshot_id.is_some(), "{report:?}");
    assert_eq!(report.rows, 0);
    let read = sandbox.read_table("tests.events", None);
    assert_eq!(snapshot_count(&read), 2, "{read:#}");
    assert_eq!(read["pyiceberg"]["rows"], 0, "{read:#}");
    assert_eq!(read["snapshots"][1]["summary"]["deleted-records"], "20");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_of_a_new_table_with_an_empty_result_commits_nothing() {
    let sandbox = Sandbox::new();
    sandbox.spec(&spec("overwrite"));
    write_events(&sandbox, 0, 1, 0);
    let report = sandbox.run(1, Some(1), None).await.expect("empty run");
    assert_eq!(report.snapshot_id, None, "{report:?}");
}
