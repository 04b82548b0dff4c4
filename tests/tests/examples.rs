//! The pipelines in `examples/` run as shipped (through the `nightshift` binary, on generated
//! TPC-H data) and PyIceberg and DuckDB read the same rows back.

use std::path::PathBuf;

use nightshift_tests::{Sandbox, snapshot_count};
use serde_json::Value;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
        .join("pipeline.toml")
}

/// Runs an example with its `data_dir` in the sandbox; returns the JSON report.
fn run(sandbox: &Sandbox, name: &str, params: &[&str]) -> Value {
    let data_dir = format!("data_dir={}", sandbox.path("data").display());
    let spec = example(name);
    let warehouse = sandbox.warehouse();
    let mut args = vec![
        "run",
        spec.to_str().unwrap(),
        "--warehouse",
        warehouse.to_str().unwrap(),
        "--output",
        "json",
        "--param",
        &data_dir,
    ];
    for param in params {
        args.extend(["--param", param]);
    }
    let out = sandbox.cli(&args);
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json report")
}

fn assert_readers_agree(read: &Value) -> u64 {
    assert_eq!(
        read["pyiceberg"]["rows"], read["duckdb"]["rows"],
        "{read:#}"
    );
    assert_eq!(
        read["pyiceberg"]["checksum"], read["duckdb"]["checksum"],
        "{read:#}"
    );
    read["pyiceberg"]["rows"].as_u64().unwrap()
}

#[test]
fn daily_revenue_appends_a_day_range_per_run() {
    let sandbox = Sandbox::new();
    sandbox.tpch();
    let first = run(&sandbox, "daily_revenue", &[]);
    let second = run(
        &sandbox,
        "daily_revenue",
        &["start_date=1995-04-01", "end_date=1995-05-01"],
    );
    assert!(first["rows"].as_u64().unwrap() > 0, "{first}");
    assert!(second["rows"].as_u64().unwrap() > 0, "{second}");
    let read = sandbox.read_table("analytics.daily_revenue", None);
    assert_eq!(snapshot_count(&read), 2, "{read:#}");
    assert_eq!(
        assert_readers_agree(&read),
        first["rows"].as_u64().unwrap() + second["rows"].as_u64().unwrap()
    );
}

#[test]
fn customer_summary_is_rebuilt_by_each_run() {
    let sandbox = Sandbox::new();
    sandbox.tpch();
    let first = run(&sandbox, "customer_summary", &[]);
    let before = sandbox.read_table("analytics.customer_summary", None);
    let rows = assert_readers_agree(&before);
    assert_eq!(rows, first["rows"].as_u64().unwrap());
    assert!(rows > 0);

    let second = run(&sandbox, "customer_summary", &[]);
    assert_eq!(second["mode"], "overwrite");
    let after = sandbox.read_table("analytics.customer_summary", None);
    assert_eq!(snapshot_count(&after), 2, "{after:#}");
    assert_eq!(after["snapshots"][1]["operation"], "overwrite");
    assert_eq!(assert_readers_agree(&after), rows, "same input, same table");
    assert_eq!(
        after["pyiceberg"]["checksum"],
        before["pyiceberg"]["checksum"]
    );
}

/// `nightshift validate ... | head -1`: a reader that stops early ends the command quietly
/// with exit code 0, without a panic on the broken pipe.
#[test]
fn a_reader_that_stops_reading_ends_the_command_without_a_panic() {
    let sandbox = Sandbox::new();
    sandbox.tpch();
    let data_dir = format!("data_dir={}", sandbox.path("data").display());
    let mut child = std::process::Command::new(nightshift_tests::nightshift_bin())
        .args(["validate", example("daily_revenue").to_str().unwrap()])
        .args(["--param", &data_dir])
        .current_dir(sandbox.path(""))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nightshift");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
