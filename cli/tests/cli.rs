//! The `nightshift` command as a scheduler and a person use it: exit codes, JSON output,
//! help text, validate.

use std::path::Path;
use std::process::{Command, Output};

const SPEC: &str = r#"[pipeline]
name = "cli_test"

[params]
min_id = "0"

[[source]]
name = "src"
format = "csv"
location = "data/src.csv"

[transform]
sql = "SELECT id, name FROM src WHERE id >= ${min_id}"

[target]
table = "tests.cli"
"#;

fn sandbox() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/src.csv"), "id,name\n1,a\n2,b\n3,c\n").unwrap();
    std::fs::write(dir.path().join("pipeline.toml"), SPEC).unwrap();
    dir
}

fn nightshift(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("NIGHTSHIFT_WAREHOUSE")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn run_prints_json_and_reruns_are_idempotent() {
    let dir = sandbox();
    let args = [
        "run",
        "pipeline.toml",
        "--job-id",
        "job-1",
        "--output",
        "json",
        "--param",
        "min_id=2",
    ];
    let out = nightshift(dir.path(), &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["status"], "succeeded");
    assert_eq!(report["job_id"], "job-1");
    assert_eq!(report["rows"], 2);
    assert_eq!(report["already_committed"], false);
    assert_eq!(report["mode"], "append");
    assert!(report["snapshot_id"].is_i64());
    assert!(
        dir.path().join("warehouse/catalog.db").exists(),
        "default warehouse is ./warehouse"
    );

    let again = nightshift(dir.path(), &args);
    assert!(again.status.success());
    let again: serde_json::Value = serde_json::from_str(stdout(&again).trim()).unwrap();
    assert_eq!(again["already_committed"], true);
    assert_eq!(again["snapshot_id"], report["snapshot_id"]);
}

#[test]
fn text_output_names_snapshot_rows_files() {
    let dir = sandbox();
    let out = nightshift(dir.path(), &["run", "pipeline.toml", "--workers", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "succeeded",
        "table     tests.cli\n",
        "snapshot  ",
        "rows      3",
        "files     ",
        "duration  ",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }

    // An overwrite says so.
    let spec = SPEC.replace("[target]\n", "[target]\nmode = \"overwrite\"\n");
    std::fs::write(dir.path().join("pipeline.toml"), spec).unwrap();
    let out = nightshift(dir.path(), &["run", "pipeline.toml", "--param", "min_id=3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("table     tests.cli (overwritten: the result replaced every row)"),
        "{text}"
    );
    assert!(text.contains("rows      1"), "{text}");
}

#[test]
fn invalid_input_exits_2_and_task_failure_exits_1() {
    let dir = sandbox();
    let out = nightshift(
        dir.path(),
        &["run", "pipeline.toml", "--param", "min_idd=1"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("did you mean `min_id`?"),
        "{}",
        stderr(&out)
    );

    std::fs::write(dir.path().join("data/src.csv"), "id,name\n1,a\nnope,b\n").unwrap();
    std::fs::write(
        dir.path().join("pipeline.toml"),
        SPEC.replace(
            "location = \"data/src.csv\"",
            "location = \"data/src.csv\"\n[source.schema]\nid = \"bigint\"",
        ),
    )
    .unwrap();
    let out = nightshift(dir.path(), &["run", "pipeline.toml", "--output", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["status"], "failed");
    assert_eq!(report["kind"], "task_failed");
    assert!(
        report["error"].as_str().unwrap().contains("src.csv"),
        "{report}"
    );
    assert!(stderr(&out).contains("nothing was committed"));
}

#[test]
fn validate_prints_sources_schema_and_plan_and_writes_nothing() {
    let dir = sandbox();
    let out = nightshift(dir.path(), &["validate", "pipeline.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "pipeline cli_test is valid",
        "src",
        "csv",
        "1 file(s)",
        "id",
        "Int64",
        "stage 1",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    assert!(
        !dir.path().join("warehouse").exists(),
        "validate must not create the warehouse"
    );
}

#[test]
fn help_teaches_the_commands() {
    let dir = sandbox();
    let out = nightshift(dir.path(), &["--help"]);
    let text = stdout(&out);
    for needle in [
        "run",
        "validate",
        "example-data",
        "nightshift run examples/daily_revenue/pipeline.toml",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    let out = nightshift(dir.path(), &["run", "--help"]);
    let text = stdout(&out);
    for needle in [
        "--param",
        "--job-id",
        "--workers",
        "--warehouse",
        "Exit codes",
        "--output",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
}
