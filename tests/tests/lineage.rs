//! Lineage in snapshot summaries: each job's snapshot says which code made it (a digest of
//! the spec and SQL, the git commit of the spec's checkout), with which parameters and from
//! which inputs (files and bytes, the snapshot of an Iceberg source); `nightshift history`
//! reads it back. Embedded and on a cluster (`run --cluster` from a git checkout).

use std::path::Path;
use std::process::Command;

use nightshift_tests::Sandbox;
use nightshift_tests::cluster::{ClusterSandbox, ClusterStorage};
use serde_json::Value;

const ACCOUNTS: &str = "id,status\n1,open\n2,closed\n3,open\n";

fn spec(data: &Path, sql: &str) -> String {
    format!(
        r#"[pipeline]
name = "accounts"

[params]
day = "0"

[[source]]
name = "accounts"
format = "csv"
location = "{data}/accounts.csv"

[transform]
sql = "{sql}"

[target]
table = "tests.accounts"
"#,
        data = data.display()
    )
}

const SQL: &str = "SELECT id, status, '${day}' AS day FROM accounts";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Puts the sandbox's spec under version control and returns the commit.
fn commit_spec(root: &Path) -> String {
    git(root, &["init", "-q"]);
    git(root, &["add", "pipeline.toml"]);
    git(root, &["commit", "-q", "-m", "spec"]);
    git(root, &["rev-parse", "HEAD"])
}

fn history(sandbox: &Sandbox, table: &str) -> Vec<Value> {
    let out = sandbox.cli(&["history", table, "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn run(sandbox: &Sandbox, args: &[&str]) {
    let out = sandbox.cli(&[&["run", "pipeline.toml"], args].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn each_snapshot_names_its_code_inputs_and_parameters() {
    let sandbox = Sandbox::new();
    sandbox.write("data/accounts.csv", ACCOUNTS);
    let data = sandbox.path("data");
    sandbox.spec(&spec(&data, SQL));
    let commit = commit_spec(sandbox.root.path());
    run(&sandbox, &["--job-id", "first", "--param", "day=1"]);

    // Another SQL, not committed to git: another digest, a dirty checkout.
    sandbox.spec(&spec(
        &data,
        &SQL.replace("SELECT id", "SELECT id * 10 AS id"),
    ));
    run(&sandbox, &["--job-id", "second", "--param", "day=2"]);

    let entries = history(&sandbox, "tests.accounts");
    assert_eq!(entries.len(), 2, "{entries:#?}");
    let (second, first) = (&entries[0]["summary"], &entries[1]["summary"]);
    assert_eq!(first["nightshift.job-id"], "first");
    assert_eq!(second["nightshift.job-id"], "second");
    assert_eq!(entries[0]["current"], true);
    assert_eq!(first["nightshift.git-commit"], commit.as_str());
    assert_eq!(second["nightshift.git-commit"], format!("{commit}-dirty"));
    let digest = |s: &Value| s["nightshift.code-sha256"].as_str().unwrap().to_string();
    assert_eq!(digest(first).len(), 64);
    assert_ne!(digest(first), digest(second));
    assert_eq!(first["nightshift.param.day"], "1");
    assert_eq!(second["nightshift.param.day"], "2");
    assert_eq!(
        first["nightshift.input.accounts"],
        format!("files=1 bytes={}", ACCOUNTS.len())
    );

    // A pipeline reading that table records the snapshot it read.
    let current = entries[0]["snapshot_id"].as_i64().unwrap();
    sandbox.spec(
        "[pipeline]\nname = \"downstream\"\n\
         [[source]]\nname = \"accounts\"\nformat = \"iceberg\"\ntable = \"tests.accounts\"\n\
         [transform]\nsql = \"SELECT status, COUNT(*) AS n FROM accounts GROUP BY status\"\n\
         [target]\ntable = \"tests.by_status\"\n",
    );
    run(&sandbox, &["--job-id", "downstream-1"]);
    let downstream = history(&sandbox, "tests.by_status");
    let input = downstream[0]["summary"]["nightshift.input.accounts"]
        .as_str()
        .unwrap();
    assert!(
        input.starts_with(&format!("snapshot={current} files=2 bytes=")),
        "{input}"
    );

    // For people: a block per snapshot, newest first.
    let out = sandbox.cli(&["history", "tests.accounts"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let second_at = text.find("job      second (pipeline accounts)").unwrap();
    let first_at = text.find("job      first (pipeline accounts)").unwrap();
    assert!(second_at < first_at, "{text}");
    assert!(text.contains(&format!("git {commit}-dirty")), "{text}");
    assert!(text.contains("params   day=2"), "{text}");
    let missing = sandbox.cli(&["history", "tests.nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such table"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_job_records_the_submitters_commit() {
    let cluster = ClusterSandbox::start(ClusterStorage::LocalWithPostgres, 1, &[]);
    cluster.sandbox.write("data/accounts.csv", ACCOUNTS);
    cluster
        .sandbox
        .spec(&spec(&cluster.sandbox.path("data"), SQL));
    let commit = commit_spec(cluster.sandbox.root.path());
    let outcome = cluster.submit("lineage-cluster", &[("day", "7")]);
    assert_eq!(
        outcome["status"],
        "succeeded",
        "{outcome:#}\n{}",
        cluster.logs()
    );
    let read = cluster.read_table("tests.accounts", None);
    let summary = &read["snapshots"][0]["summary"];
    assert_eq!(
        summary["nightshift.git-commit"],
        commit.as_str(),
        "{summary}"
    );
    assert_eq!(summary["nightshift.param.day"], "7");
    assert_eq!(
        summary["nightshift.input.accounts"],
        format!("files=1 bytes={}", ACCOUNTS.len())
    );
    assert_eq!(
        summary["nightshift.code-sha256"].as_str().map(str::len),
        Some(64)
    );
}

/// OpenLineage run events from `nightshift run` with `NIGHTSHIFT_LINEAGE_FILE`, checked by
/// the OpenLineage client (`tests/py/openlineage_check.py`).
fn openlineage_events(sandbox: &Sandbox, file: &std::path::Path) -> serde_json::Value {
    let mut check = std::process::Command::new(nightshift_tests::python());
    check
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/openlineage_check.py"))
        .arg(file)
        .current_dir(sandbox.path(""));
    nightshift_tests::json_output(check)
}

#[test]
fn openlineage_events_start_and_end_each_run_and_the_client_accepts_them() {
    let sandbox = Sandbox::new();
    sandbox.write("data/orders.csv", "id,amount\n1,10\n2,-5\n3,7\n");
    let spec = |severity: &str| {
        format!(
            r#"[pipeline]
name = "örders"

[params]
api_token = "tkn-SECRET-123"

[[source]]
name = "orders"
format = "csv"
location = "data/orders.csv"

[transform]
sql = "SELECT id, amount FROM orders WHERE '${{api_token}}' <> ''"

[target]
table = "tests.orders"

[[check]]
name = "amount_positive"
type = "range"
columns = ["amount"]
min = 0
severity = "{severity}"
"#
        )
    };
    let events = sandbox.path("lineage.jsonl");
    let run = |job: &str| {
        std::process::Command::new(nightshift_tests::nightshift_bin())
            .args(["run", "pipeline.toml", "--job-id", job])
            .current_dir(sandbox.path(""))
            .env("NIGHTSHIFT_LINEAGE_FILE", &events)
            .env_remove("OPENLINEAGE_URL")
            .output()
            .unwrap()
    };
    sandbox.spec(&spec("warn"));
    assert!(run("ol-1").status.success());
    sandbox.spec(&spec("error"));
    assert_eq!(run("ol-2").status.code(), Some(1));

    // The events leave for another server: a secret-named parameter's value in the SQL is
    // masked, as on the report page.
    let raw = std::fs::read_to_string(&events).unwrap();
    assert!(
        !raw.contains("tkn-SECRET-123") && raw.contains("'***' <> ''"),
        "{raw}"
    );
    let seen = openlineage_events(&sandbox, &events);
    let kinds: Vec<(&str, &str)> = seen
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["eventType"].as_str().unwrap(),
                e["runId"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(kinds.len(), 4, "{seen:#}");
    assert_eq!(
        kinds.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        ["START", "COMPLETE", "START", "FAIL"]
    );
    // One run id per job, the same on its start and end events.
    assert_eq!(kinds[0].1, kinds[1].1);
    assert_eq!(kinds[2].1, kinds[3].1);
    assert_ne!(kinds[0].1, kinds[2].1);
    let complete = &seen[1];
    assert_eq!(complete["job"], "örders");
    assert_eq!(complete["outputs"], serde_json::json!(["tests.orders"]));
    assert_eq!(complete["rows"], 3);
    assert!(
        complete["inputs"][0]
            .as_str()
            .unwrap()
            .ends_with("data/orders.csv"),
        "{complete:#}"
    );
    assert_eq!(complete["assertions"][0]["assertion"], "amount_positive");
    assert_eq!(complete["assertions"][0]["success"], false);
    assert_eq!(complete["assertions"][0]["column"], "amount");
    let failed = &seen[3];
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("check `amount_positive` failed"),
        "{failed:#}"
    );
}

#[test]
fn openlineage_events_are_posted_to_the_endpoint_with_its_key() {
    use std::io::BufRead;
    let sandbox = Sandbox::new();
    sandbox.write("data/orders.csv", "id,amount\n1,10\n");
    sandbox.spec(
        r#"[pipeline]
name = "posted"

[[source]]
name = "orders"
format = "csv"
location = "data/orders.csv"

[transform]
sql = "SELECT id, amount FROM orders"

[target]
table = "tests.posted"
"#,
    );
    let received = sandbox.path("received.jsonl");
    let mut sink = Command::new(nightshift_tests::python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("py/lineage_sink.py"))
        .arg(&received)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufReader::new(sink.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let out = Command::new(nightshift_tests::nightshift_bin())
        .args(["run", "pipeline.toml", "--job-id", "posted-1"])
        .current_dir(sandbox.path(""))
        .env(
            "OPENLINEAGE_URL",
            format!("http://127.0.0.1:{}/", port.trim()),
        )
        .env("OPENLINEAGE_API_KEY", "s3cret")
        .env_remove("NIGHTSHIFT_LINEAGE_FILE")
        .output()
        .unwrap();
    let _ = sink.kill();
    let _ = sink.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = openlineage_events(&sandbox, &received);
    let kinds: Vec<&str> = seen
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["START", "COMPLETE"], "{seen:#}");
    let requests = std::fs::read_to_string(received.with_extension("jsonl.requests")).unwrap();
    assert_eq!(requests.lines().count(), 2, "{requests}");
    for line in requests.lines() {
        let request: Value = serde_json::from_str(line).unwrap();
        assert_eq!(request["path"], "/api/v1/lineage");
        assert_eq!(request["auth"], "Bearer s3cret");
    }
}
