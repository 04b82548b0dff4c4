//! `[[check]]` on the published rows, through the binary (embedded) and on a cluster: each
//! type passes and fails; an error-severity failure publishes nothing and says which check,
//! how many rows and which; a warning publishes and reports.

use nightshift_tests::cluster::{ClusterSandbox, ClusterStorage};
use nightshift_tests::{Sandbox, check_report_page, snapshot_count, unreferenced};
use serde_json::Value;

const TABLE: &str = "tests.accounts";

/// Five accounts; `ünï` is the one odd row: a negative balance and a status outside the list.
fn write_accounts(sandbox: &Sandbox) -> std::path::PathBuf {
    sandbox.write(
        "data/accounts.csv",
        "id,status,balance,email,seen\n\
         1,open,10,a@example.com,2024-05-01\n\
         2,open,0,b@example.com,2024-05-03\n\
         3,closed,5,c@example.com,\n\
         4,frozen,-7,ünï@example.com,2024-04-30\n\
         5,open,3,,2024-05-02\n",
    );
    sandbox.path("data")
}

fn spec(data: &std::path::Path, checks: &str) -> String {
    format!(
        r#"[pipeline]
name = "accounts"

[[source]]
name = "accounts"
format = "csv"
location = "{data}/accounts.csv"

[transform]
sql = "SELECT id, status, balance, email, seen FROM accounts"

[target]
table = "{TABLE}"

{checks}
"#,
        data = data.display()
    )
}

fn check(name: &str, body: &str, severity: &str) -> String {
    format!("[[check]]\nname = \"{name}\"\n{body}\nseverity = \"{severity}\"\n")
}

/// Each check type: one that holds on the accounts and one that fails on them, with the
/// failing count and a word of the sample the failure must show.
const CASES: &[(&str, &str, &str, u64, &str)] = &[
    (
        "type = \"not_null\"\ncolumns = [\"id\", \"status\"]",
        "type = \"not_null\"\ncolumns = [\"email\"]",
        "email",
        1,
        "\"id\":5",
    ),
    (
        "type = \"accepted_values\"\ncolumns = [\"status\"]\nvalues = [\"open\", \"closed\", \"frozen\"]",
        "type = \"accepted_values\"\ncolumns = [\"status\"]\nvalues = [\"open\", \"closed\"]",
        "status",
        1,
        "frozen",
    ),
    (
        "type = \"range\"\ncolumns = [\"balance\"]\nmin = -10\nmax = 10",
        "type = \"range\"\ncolumns = [\"balance\"]\nmin = 0",
        "balance",
        1,
        "-7",
    ),
    (
        "type = \"regex\"\ncolumns = [\"email\"]\npattern = \"^[^@]+@example\\\\.com$\"",
        "type = \"regex\"\ncolumns = [\"email\"]\npattern = \"^[a-z]@\"",
        "email",
        1,
        "ünï@example.com",
    ),
    (
        "type = \"row_count\"\nmin = 5\nmax = 5",
        "type = \"row_count\"\nmin = 6",
        "rows",
        5,
        "",
    ),
    (
        "type = \"unique\"\ncolumns = [\"id\"]",
        "type = \"unique\"\ncolumns = [\"status\"]",
        "share their (status)",
        3,
        "\"rows_with_this_key\":3",
    ),
    (
        "type = \"sql\"\nsql = \"SELECT * FROM result WHERE balance > 100\"",
        "type = \"sql\"\nsql = \"SELECT id, email FROM result WHERE balance < 0 OR email IS NULL\"",
        "rows returned by SELECT id, email",
        2,
        "ünï@example.com",
    ),
    (
        "type = \"freshness\"\ncolumns = [\"seen\"]\nmax_age = \"100000d\"",
        "type = \"freshness\"\ncolumns = [\"seen\"]\nmax_age = \"36h\"",
        "the newest seen is older than 36h",
        1,
        "2024-05-03",
    ),
];

fn run_json(sandbox: &Sandbox) -> (Option<i32>, Value, String) {
    let out = sandbox.cli(&["run", "pipeline.toml", "--output", "json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (
        out.status.code(),
        json,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn every_check_type_passes_and_fails_and_an_error_publishes_nothing() {
    let sandbox = Sandbox::new();
    let data = write_accounts(&sandbox);
    // Every check that holds, as errors, plus every failing one as a warning: published.
    let mut checks = String::new();
    for (i, (holds, fails, ..)) in CASES.iter().enumerate() {
        checks += &check(&format!("holds_{i}"), holds, "error");
        checks += &check(&format!("warns_{i}"), fails, "warn");
    }
    sandbox.spec(&spec(&data, &checks));
    let (code, report, stderr) = run_json(&sandbox);
    assert_eq!(code, Some(0), "{stderr}\n{report:#}");
    let results = report["checks"].as_array().unwrap();
    assert_eq!(results.len(), 2 * CASES.len(), "{report:#}");
    for (i, (.., failing, sample)) in CASES.iter().enumerate() {
        let holds = results
            .iter()
            .find(|r| r["name"] == format!("holds_{i}"))
            .unwrap();
        assert_eq!(holds["passed"], true, "{holds:#}");
        let warns = results
            .iter()
            .find(|r| r["name"] == format!("warns_{i}"))
            .unwrap();
        assert_eq!(warns["passed"], false, "{warns:#}");
        assert_eq!(warns["failed_rows"], *failing, "{warns:#}");
        let samples: String = warns["samples"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(samples.contains(sample), "{warns:#}");
    }
    let read = sandbox.read_table(TABLE, None);
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
    let summary = &read["snapshots"][0]["summary"];
    assert_eq!(summary["nightshift.check.holds_0"], "passed", "{summary}");
    assert!(
        summary["nightshift.check.warns_2"]
            .as_str()
            .is_some_and(|v| v.starts_with("failed (warn): 1 of 5 rows fail")),
        "{summary}"
    );
    let committed = sandbox.data_files();

    // Each failing check as an error: exit 1, the check named with its count and a sample,
    // no new snapshot, no file left behind.
    for (i, (_, fails, column, failing, sample)) in CASES.iter().enumerate() {
        let name = format!("must_{i}");
        sandbox.spec(&spec(&data, &check(&name, fails, "error")));
        let (code, outcome, stderr) = run_json(&sandbox);
        assert_eq!(code, Some(1), "{stderr}");
        assert_eq!(outcome["kind"], "checks_failed", "{outcome:#}");
        assert!(
            stderr.contains("nothing was committed")
                && stderr.contains(&format!("check `{name}` failed")),
            "{stderr}"
        );
        assert!(
            stderr.contains(column) && stderr.contains(sample),
            "{stderr}"
        );
        let failed = &outcome["checks"][0];
        assert_eq!(failed["failed_rows"], *failing, "{outcome:#}");
        let read = sandbox.read_table_with(TABLE, None, &["--references"]);
        assert_eq!(snapshot_count(&read), 1, "{name}: {read:#}");
        assert_eq!(sandbox.data_files(), committed, "{name}");
        assert_eq!(
            unreferenced(&sandbox.data_files(), &read),
            Vec::<&String>::new()
        );
    }
}

#[test]
fn a_check_on_a_missing_column_is_refused_before_anything_runs() {
    let sandbox = Sandbox::new();
    let data = write_accounts(&sandbox);
    sandbox.spec(&spec(
        &data,
        &check(
            "typo",
            "type = \"not_null\"\ncolumns = [\"emial\"]",
            "error",
        ),
    ));
    let out = sandbox.cli(&["validate", "pipeline.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("[[check]] `typo`") && stderr.contains("emial"),
        "{stderr}"
    );
    let out = sandbox.cli(&["run", "pipeline.toml"]);
    assert_eq!(out.status.code(), Some(2));
    sandbox.spec(&spec(
        &data,
        &check(
            "query_typo",
            "type = \"sql\"\nsql = \"SELECT * FROM result WHERE ballance < 0\"",
            "error",
        ),
    ));
    let out = sandbox.cli(&["validate", "pipeline.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("[[check]] `query_typo`") && stderr.contains("ballance"),
        "{stderr}"
    );
    for (body, says) in [
        (
            "on = \"acounts\"\ntype = \"not_null\"\ncolumns = [\"id\"]",
            "is neither \"result\" nor a [[source]] (sources: accounts)",
        ),
        (
            "on = \"accounts\"\ntype = \"not_null\"\ncolumns = [\"identifier\"]",
            "identifier",
        ),
    ] {
        sandbox.spec(&spec(&data, &check("on_source", body, "error")));
        let out = sandbox.cli(&["validate", "pipeline.toml"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
}

#[test]
fn checks_on_a_source_run_before_any_task_and_an_error_writes_nothing() {
    let sandbox = Sandbox::new();
    let data = write_accounts(&sandbox);
    let on_source = |severity: &str| {
        [
            check(
                "source_has_rows",
                "on = \"accounts\"\ntype = \"row_count\"\nmin = 5\nmax = 5",
                "error",
            ),
            check(
                "source_ids_unique",
                "on = \"accounts\"\ntype = \"unique\"\ncolumns = [\"id\"]",
                "error",
            ),
            check(
                "source_emails",
                "on = \"accounts\"\ntype = \"not_null\"\ncolumns = [\"email\"]",
                severity,
            ),
            check(
                "source_balances",
                "on = \"accounts\"\ntype = \"sql\"\nsql = \"SELECT id FROM accounts WHERE balance < -100\"",
                "error",
            ),
        ]
        .concat()
    };
    sandbox.spec(&spec(&data, &on_source("warn")));
    let (code, report, stderr) = run_json(&sandbox);
    assert_eq!(code, Some(0), "{stderr}\n{report:#}");
    let results = report["checks"].as_array().unwrap();
    let verdict = |name: &str| {
        results
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {report:#}"))
            .clone()
    };
    assert_eq!(verdict("source_has_rows")["passed"], true);
    assert!(
        verdict("source_has_rows")["detail"]
            .as_str()
            .unwrap()
            .starts_with("source `accounts`: 5 rows read"),
        "{report:#}"
    );
    assert_eq!(verdict("source_ids_unique")["passed"], true);
    assert_eq!(verdict("source_balances")["passed"], true);
    let emails = verdict("source_emails");
    assert_eq!(emails["passed"], false);
    assert_eq!(emails["failed_rows"], 1);
    assert!(
        emails["samples"][0].as_str().unwrap().contains("\"id\":5"),
        "{emails:#}"
    );

    // As an error, the job stops before any task: no table, no file.
    let sandbox = Sandbox::new();
    let data = write_accounts(&sandbox);
    sandbox.spec(&spec(&data, &on_source("error")));
    let (code, report, stderr) = run_json(&sandbox);
    assert_eq!(code, Some(1), "{stderr}\n{report:#}");
    assert!(
        stderr.contains(
            "check `source_emails` failed: source `accounts`: 1 rows fail \"email\" IS NOT NULL"
        ),
        "{stderr}"
    );
    assert!(
        sandbox.data_files().is_empty(),
        "{:?}",
        sandbox.data_files()
    );
    assert_eq!(sandbox.read_table(TABLE, None)["exists"], false);
}

#[test]
fn a_relationship_check_names_the_keys_another_table_lacks() {
    let sandbox = Sandbox::new();
    let data = write_accounts(&sandbox);
    let statuses = |codes: &str| {
        sandbox.write("data/statuses.csv", format!("code\n{codes}"));
        sandbox.write(
            "statuses.toml",
            "[pipeline]\nname = \"statuses\"\n[[source]]\nname = \"s\"\nformat = \"csv\"\nlocation = \"data/statuses.csv\"\n\
             [transform]\nsql = \"SELECT code FROM s\"\n[target]\ntable = \"tests.statuses\"\nmode = \"overwrite\"\n",
        );
        let out = sandbox.cli(&["run", "statuses.toml"]);
        assert!(out.status.success(), "{out:?}");
    };
    statuses("open\nclosed\n");
    let known = |to: &str| {
        check(
            "known",
            &format!(
                "type = \"relationship\"\ncolumns = [\"status\"]\nto = \"{to}\"\nto_columns = [\"code\"]"
            ),
            "error",
        )
    };
    sandbox.spec(&spec(&data, &known("tests.statuses")));
    let (code, outcome, stderr) = run_json(&sandbox);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "check `known` failed: 1 of 5 rows have a (status) that tests.statuses lacks"
        ) && stderr.contains("frozen"),
        "{stderr}"
    );
    assert_eq!(outcome["checks"][0]["failed_rows"], 1, "{outcome:#}");
    assert!(
        !sandbox.read_table(TABLE, None)["exists"]
            .as_bool()
            .unwrap_or(true)
    );

    // Once the other table has the key, the job publishes.
    statuses("open\nclosed\nfrozen\n");
    let (code, _, stderr) = run_json(&sandbox);
    assert_eq!(code, Some(0), "{stderr}");

    // A table that does not exist is a spec error, named by the check.
    sandbox.spec(&spec(&data, &known("tests.nope")));
    let out = sandbox.cli(&["validate", "pipeline.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("[[check]] `known`") && stderr.contains("tests.nope"),
        "{stderr}"
    );
}

/// The accounts in two files, written as two (two tasks): a `unique` check then runs on the
/// workers over two partitions, shuffled by key. The spec with `checks`.
fn two_file_spec(sandbox: &Sandbox, checks: &str) -> String {
    let data = write_accounts(sandbox);
    let accounts = std::fs::read_to_string(data.join("accounts.csv")).unwrap();
    let (header, rows) = accounts.split_once('\n').unwrap();
    let rows: Vec<&str> = rows.lines().collect();
    for (i, half) in rows.chunks(3).enumerate() {
        sandbox.write(
            &format!("parts/accounts-{i}.csv"),
            format!("{header}\n{}\n", half.join("\n")),
        );
    }
    spec(&sandbox.path("parts"), checks)
        .replace("accounts.csv", "accounts-*.csv")
        .replace(
            "[target]",
            "[execution]\nshuffle_partitions = 2\n\n[target]",
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_while_a_check_runs_resumes_it_and_counts_once() {
    let mut cluster = ClusterSandbox::start(
        ClusterStorage::LocalWithPostgres,
        2,
        &[("FAILPOINTS", "worker-task-delay=return(700)")],
    );
    let checks = check("one_per_status", CASES[5].1, "error");
    cluster
        .sandbox
        .spec(&two_file_spec(&cluster.sandbox, &checks));
    let mut client = cluster.submit_in_background("checks-restart");
    // Stage 1 writes the job's files; stages 2 and 3 are the unique check's. Stage 3
    // starts once stage 2's outputs are recorded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cluster.coordinator_log().contains("stage started stage=3") {
        assert!(std::time::Instant::now() < deadline, "{}", cluster.logs());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    cluster.kill_coordinator();
    std::thread::sleep(std::time::Duration::from_millis(500));
    cluster.start_coordinator();
    let outcome = cluster.wait_for_outcome(&mut client);
    assert_eq!(
        outcome["status"],
        "failed",
        "{outcome:#}\n{}",
        cluster.logs()
    );
    assert_eq!(outcome["kind"], "checks_failed", "{outcome:#}");
    // Counted once, though the check's stages ran under two coordinators.
    assert!(
        outcome["error"]
            .as_str()
            .is_some_and(|e| e.contains("check `one_per_status` failed: 3 of 5 rows share")),
        "{outcome:#}"
    );
    assert!(
        cluster.logs().contains("resuming"),
        "the restarted coordinator reuses the recorded outputs\n{}",
        cluster.logs()
    );
    let left = cluster.wait_until_clean(TABLE, std::time::Duration::from_secs(30));
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_workers_count_and_a_failed_check_commits_nothing() {
    let cluster = ClusterSandbox::start(ClusterStorage::LocalWithPostgres, 2, &[]);
    let data = write_accounts(&cluster.sandbox);
    let checks = check("known_status", CASES[1].1, "error")
        + &check("row_total", CASES[4].0, "error")
        + &check("one_per_status", CASES[5].1, "error")
        + &check(
            "source_ids_present",
            "on = \"accounts\"\ntype = \"not_null\"\ncolumns = [\"id\"]",
            "error",
        );
    cluster
        .sandbox
        .spec(&two_file_spec(&cluster.sandbox, &checks));
    let outcome = cluster.submit("checks-fail", &[]);
    assert_eq!(
        outcome["status"],
        "failed",
        "{outcome:#}\n{}",
        cluster.logs()
    );
    assert_eq!(outcome["kind"], "checks_failed", "{outcome:#}");
    assert!(
        outcome["error"]
            .as_str()
            .is_some_and(|e| e.contains("check `known_status` failed: 1 of 5 rows")
                && e.contains("frozen")
                && e.contains("check `one_per_status` failed: 3 of 5 rows share their (status)")),
        "{outcome:#}"
    );
    // The unique check ran on the workers, as stages of the job of its own: a hash
    // shuffle of the keys, then a count of each task's share.
    let out = cluster.sandbox.cli(&[
        "report",
        "checks-fail",
        "--cluster",
        &cluster.config.display().to_string(),
        "--out",
        "checks-fail.html",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(cluster.sandbox.path("checks-fail.html")).unwrap();
    let seen = check_report_page(&page);
    let boxes: Vec<&str> = seen["stage_boxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b.as_str())
        .filter(|b| b.contains("· check one_per_status:"))
        .collect();
    assert!(
        boxes.len() >= 2 && boxes.iter().any(|b| b.contains("Hash([status@")),
        "{seen:#}"
    );
    let check_stage: Vec<String> = boxes
        .iter()
        .filter_map(|b| b.split_whitespace().nth(1).map(|id| format!("stage {id} ")))
        .collect();
    let on_workers = seen["task_bars"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b.as_str())
        .filter(|b| check_stage.iter().any(|s| b.starts_with(s.as_str())))
        .filter(|b| b.contains("(won) on w"))
        .count();
    assert!(on_workers >= 2, "{seen:#}");
    // So did the check on the source, before the job's own tasks.
    let source_check = seen["stage_boxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b.as_str())
        .find(|b| b.contains("· check source_ids_present:"))
        .unwrap_or_else(|| panic!("{seen:#}"));
    assert!(source_check.contains("accounts-0.csv"), "{source_check}");
    let verdict = seen["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == "source_ids_present")
        .unwrap_or_else(|| panic!("{seen:#}"));
    assert_eq!(verdict[1], "passed", "{seen:#}");

    let passing = check("row_total", CASES[4].0, "error");
    cluster.sandbox.spec(&spec(&data, &passing));
    let outcome = cluster.submit("checks-pass", &[]);
    assert_eq!(
        outcome["status"],
        "succeeded",
        "{outcome:#}\n{}",
        cluster.logs()
    );
    let read = cluster.read_table(TABLE, None);
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
    assert_eq!(
        read["snapshots"][0]["summary"]["nightshift.job-id"],
        "checks-pass"
    );
}

#[test]
fn row_count_relative_to_the_previous_run() {
    let sandbox = Sandbox::new();
    let data = write_accounts(&sandbox);
    let steady = check(
        "steady",
        "type = \"row_count\"\nmax_change = \"30%\"",
        "error",
    );
    sandbox.spec(&spec(&data, &steady));
    // The first run has nothing to compare with; the second publishes as many rows.
    for expected in [
        "no previous run with rows to compare with",
        "the previous run published 5 (+0.0 %)",
    ] {
        let (code, report, stderr) = run_json(&sandbox);
        assert_eq!(code, Some(0), "{stderr}\n{report:#}");
        let detail = report["checks"][0]["detail"].as_str().unwrap();
        assert!(detail.contains(expected), "{detail}");
    }
    // A feed that lost most of its rows: refused, and nothing is published.
    sandbox.write(
        "data/accounts.csv",
        "id,status,balance,email,seen\n1,open,10,a@example.com,2024-05-01\n2,open,0,b@example.com,2024-05-03\n",
    );
    let (code, report, stderr) = run_json(&sandbox);
    assert_eq!(code, Some(1), "{stderr}\n{report:#}");
    assert!(
        stderr.contains(
            "2 rows written; the previous run published 5 (-60.0 %), within ±30 % expected"
        ),
        "{stderr}"
    );
    let read = sandbox.read_table(TABLE, None);
    assert_eq!(snapshot_count(&read), 2, "{read:#}");
    assert_eq!(read["duckdb"]["rows"], 10);
}
