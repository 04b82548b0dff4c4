//! What a run publishes is what its SQL and sources mean, or the run fails with nothing
//! committed: the shapes a trial on unseen data found published wrong (a bare `LIMIT` per
//! task, CSV files read by position, `null_value` ignored, non-finite partition values,
//! decimals past their precision, merge SQL whose rows differ between its evaluations).

use nightshift_tests::Sandbox;
use serde_json::Value;

/// A pipeline reading `location` (CSV, `options`) into `ns.t` with `sql`; `target` adds to
/// `[target]`.
fn spec(location: &str, options: &str, sql: &str, target: &str) -> String {
    format!(
        "[pipeline]\nname = \"values\"\n\n[[source]]\nname = \"src\"\nformat = \"csv\"\nlocation = \"{location}\"\n{options}\n\n[transform]\nsql = \"{sql}\"\n\n[target]\ntable = \"ns.t\"\n{target}\n"
    )
}

/// `nightshift run pipeline.toml`: exit code and stderr.
fn run(sandbox: &Sandbox, toml: &str) -> (Option<i32>, String) {
    sandbox.spec(toml);
    let out = sandbox.cli(&["run", "pipeline.toml"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The table's rows as PyIceberg reads them, sorted by `id`.
fn rows(sandbox: &Sandbox) -> Vec<Value> {
    sandbox.with_pyiceberg_table(
        "ns.t",
        "rows = sorted(t.scan().to_arrow().to_pylist(), key=lambda r: r['id'])\n\
         json.dump(rows, sys.stdout, default=str)",
    )
}

/// Whether the sandbox's catalog holds `ns.t` (PyIceberg; no catalog, no table).
fn table_exists(sandbox: &Sandbox) -> bool {
    let script = "import json, os, sys\n\
         from pyiceberg.catalog.sql import SqlCatalog\n\
         w = sys.argv[1]\n\
         db = os.path.join(w, 'catalog.db')\n\
         found = os.path.exists(db) and SqlCatalog('nightshift', uri=f'sqlite:///{db}', warehouse=w).table_exists('ns.t')\n\
         json.dump(found, sys.stdout)";
    nightshift_tests::python_json(script, &[&sandbox.warehouse().display().to_string()])
}

/// 400 files of one row each, read by several tasks: `LIMIT 5` publishes 5 rows (every
/// task kept 5 of its own, and the table got 5 per task).
#[test]
fn a_bare_limit_publishes_that_many_rows_whatever_the_tasks() {
    let sandbox = Sandbox::new();
    for i in 0..400 {
        sandbox.write(&format!("data/part-{i:03}.csv"), format!("id,v\n{i},x\n"));
    }
    let (code, stderr) = run(
        &sandbox,
        &spec("data/", "", "SELECT id, v FROM src LIMIT 5", ""),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(rows(&sandbox).len(), 5);
    // The source is read by several tasks (one would not show a limit per task).
    let plan = sandbox.cli(&["validate", "pipeline.toml"]);
    let plan = String::from_utf8_lossy(&plan.stdout).to_string();
    assert!(plan.contains(" tasks)"), "{plan}");
}

/// A second file with the first's columns reordered is refused by name; `null_value` is
/// NULL in text and number columns alike.
#[test]
fn csv_files_are_read_by_their_headers_and_null_value() {
    let sandbox = Sandbox::new();
    sandbox.write("data/a.csv", "id,qty,price\n1,5,100\n");
    sandbox.write("data/b.csv", "price,qty,id\n300,7,3\n");
    let (code, stderr) = run(&sandbox, &spec("data/", "", "SELECT * FROM src", ""));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("b.csv names its columns `price,qty,id`") && stderr.contains("a.csv"),
        "{stderr}"
    );

    sandbox.write("nulls/a.csv", "id,name,n\n1,NA,NA\n2,x,5\n");
    let options = "options = { null_value = \"NA\" }";
    let (code, stderr) = run(&sandbox, &spec("nulls/", options, "SELECT * FROM src", ""));
    assert_eq!(code, Some(0), "{stderr}");
    let published = rows(&sandbox);
    assert_eq!(
        published,
        vec![
            serde_json::json!({"id": 1, "name": null, "n": null}),
            serde_json::json!({"id": 2, "name": "x", "n": 5}),
        ]
    );
}

/// A NaN identity partition value, and a SUM past its decimal precision, fail the run with
/// the column named and nothing committed.
#[test]
fn values_the_table_cannot_hold_fail_the_run_naming_the_column() {
    let sandbox = Sandbox::new();
    sandbox.write("data/a.csv", "id,f\n1,1.5\n2,NaN\n");
    let (code, stderr) = run(
        &sandbox,
        &spec(
            "data/a.csv",
            "",
            "SELECT id, CAST(f AS DOUBLE) AS f FROM src",
            "partition_by = [\"identity(f)\"]",
        ),
    );
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("column `f`") && stderr.contains("NaN"),
        "{stderr}"
    );
    let nines = "9".repeat(38);
    let sum = format!(
        "SELECT 1 AS id, SUM(CAST(v AS DECIMAL(38, 0))) AS s FROM (VALUES ('{nines}'), ('{nines}')) AS x(v)"
    );
    let (code, stderr) = run(&sandbox, &spec("data/a.csv", "", &sum, ""));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("column `s` row 1") && stderr.contains("more digits than decimal(38, 0)"),
        "{stderr}"
    );
    assert!(!table_exists(&sandbox));
}

/// A merge whose SQL keeps a random half is refused before anything runs; the table keeps
/// every key once.
#[test]
fn a_merge_of_rows_that_differ_between_evaluations_is_refused() {
    let sandbox = Sandbox::new();
    let keys: String = (1..=100).map(|k| format!("{k},old\n")).collect();
    sandbox.write("data/a.csv", format!("id,v\n{keys}"));
    let (code, stderr) = run(
        &sandbox,
        &spec("data/a.csv", "", "SELECT id, v FROM src", ""),
    );
    assert_eq!(code, Some(0), "{stderr}");
    let merge = "mode = \"merge\"\nmerge_keys = [\"id\"]";
    let (code, stderr) = run(
        &sandbox,
        &spec(
            "data/a.csv",
            "",
            "SELECT id, 'new' AS v FROM src WHERE random() < 0.5",
            merge,
        ),
    );
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("random()") && stderr.contains("more than once"),
        "{stderr}"
    );
    let published = rows(&sandbox);
    assert_eq!(published.len(), 100);
    assert!(published.iter().all(|r| r["v"] == "old"));
}

/// An integer `SUM` past bigint fails naming the sum (it wrapped: 400 × 2^62 published 0),
/// as does integer arithmetic past its type, with nothing committed; sums that fit are
/// exact, also when partial sums on the way pass bigint, and `i64::MIN` itself fits.
#[test]
fn integer_overflow_fails_the_run_and_what_fits_is_exact() {
    let sandbox = Sandbox::new();
    let quarter = 1_i64 << 62;
    for i in 0..400 {
        let w = if i < 200 { quarter } else { -quarter };
        sandbox.write(
            &format!("big/part-{i:03}.csv"),
            format!("id,v,w\n{i},{quarter},{w}\n"),
        );
    }
    let sum = "SELECT 1 AS id, SUM(v) AS total FROM src";
    let (code, stderr) = run(&sandbox, &spec("big/", "", sum, ""));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("integer overflow") && stderr.contains("sum(src.v)"),
        "{stderr}"
    );
    let product = "SELECT id, v * 4 AS v4 FROM src";
    let (code, stderr) = run(&sandbox, &spec("big/", "", product, ""));
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("integer overflow") && stderr.contains("4611686018427387904 * 4"),
        "{stderr}"
    );
    assert!(!table_exists(&sandbox));

    let fits = "SELECT 1 AS id, SUM(w) AS total, SUM(v / 1024) AS s, MIN(w - v) AS lo FROM src";
    let (code, stderr) = run(&sandbox, &spec("big/", "", fits, ""));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        rows(&sandbox),
        vec![serde_json::json!({"id": 1, "total": 0, "s": 400_i64 << 52, "lo": i64::MIN})]
    );
}

/// A timestamp in the last second of a day before 1970 is filed under its own day (iceberg-rust
/// filed `1969-12-30 23:59:59.5` under 1969-12-31), so a reader's filter on the day, which
/// prunes by partition, finds it; and an `overwrite_partitions` of the next day keeps it.
#[test]
fn a_timestamp_before_1970_is_filed_under_its_own_day() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "data/a.csv",
        "id,ts\n1,1969-12-30T23:59:59.5\n2,1969-12-30T12:00:00\n3,1969-12-31T00:00:00\n4,1955-06-01T23:59:59.25\n",
    );
    let sql = "SELECT id, CAST(ts AS TIMESTAMP) AS ts FROM src";
    let partitioned = "mode = \"overwrite_partitions\"\npartition_by = [\"day(ts)\"]";
    let (code, stderr) = run(&sandbox, &spec("data/a.csv", "", sql, partitioned));
    assert_eq!(code, Some(0), "{stderr}");
    let found_by_day = |sandbox: &Sandbox| -> Vec<i64> {
        sandbox.with_pyiceberg_table(
            "ns.t",
            "days = [('1969-12-30', '1969-12-31'), ('1969-12-31', '1970-01-01'), ('1955-06-01', '1955-06-02')]\n\
             json.dump([t.scan(row_filter=f\"ts >= '{a}T00:00:00' and ts < '{b}T00:00:00'\").to_arrow().num_rows for a, b in days], sys.stdout)",
        )
    };
    assert_eq!(found_by_day(&sandbox), vec![2, 1, 1]);

    // Rerun 1969-12-31 alone: the day before keeps both its rows.
    sandbox.write("data/a.csv", "id,ts\n3,1969-12-31T00:00:00\n");
    let (code, stderr) = run(&sandbox, &spec("data/a.csv", "", sql, partitioned));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(found_by_day(&sandbox), vec![2, 1, 1]);
}
