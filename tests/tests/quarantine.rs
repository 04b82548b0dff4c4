//! `on_fail = "quarantine"`: the rows a row-level check fails go to `<table>__rejects` with the
//! check's name, the reason and the job id; the other rows are published. Each table gets one
//! snapshot per job, the rejects first; a crash between the two commits is finished by the
//! rerun without a second rejects snapshot; a failed error check publishes neither.

use nightshift_tests::cluster::{ClusterSandbox, ClusterStorage};
use nightshift_tests::{Sandbox, first_rows, nightshift_bin, snapshot_count, unreferenced};
use serde_json::Value;

const TABLE: &str = "tests.accounts";
const REJECTS: &str = "tests.accounts__rejects";

/// Six accounts: `4` has a status outside the list and a negative balance (it fails both
/// quarantining checks, and is set aside by the first), `6` only a negative balance, `5` no
/// email (a warning, published).
const ACCOUNTS: &str = "id,status,balance,email\n\
     1,open,10,a@example.com\n\
     2,open,0,b@example.com\n\
     3,closed,5,c@example.com\n\
     4,frozen,-7,d@example.com\n\
     5,open,3,\n\
     6,closed,-1,ünï@example.com\n";

const QUARANTINE: &str = r#"
[[check]]
name = "known_status"
type = "accepted_values"
columns = ["status"]
values = ["open", "closed"]
on_fail = "quarantine"

[[check]]
name = "balance_not_negative"
type = "range"
columns = ["balance"]
min = 0
on_fail = "quarantine"

[[check]]
name = "email_present"
type = "not_null"
columns = ["email"]
severity = "warn"
"#;

fn spec(data: &std::path::Path, select: &str, extra: &str) -> String {
    format!(
        r#"[pipeline]
name = "accounts"

[[source]]
name = "accounts"
format = "csv"
location = "{data}"

[transform]
sql = "SELECT {select} FROM accounts"

[target]
table = "{TABLE}"
schema_evolution = "add_columns"

{QUARANTINE}
{extra}
"#,
        data = data.display()
    )
}

/// Runs the pipeline with `--job-id`, `FAILPOINTS` if given: (exit code, JSON report, stderr).
fn run(sandbox: &Sandbox, job: &str, failpoints: Option<&str>) -> (Option<i32>, Value, String) {
    let mut cmd = std::process::Command::new(nightshift_bin());
    cmd.args(["run", "pipeline.toml", "--output", "json", "--job-id", job])
        .current_dir(sandbox.path(""))
        .env_remove("RUST_LOG");
    if let Some(failpoints) = failpoints {
        cmd.env("FAILPOINTS", failpoints);
    }
    let out = cmd.output().expect("run nightshift");
    let stdout = String::from_utf8_lossy(&out.stdout);
    (
        out.status.code(),
        serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name}: {report:#}"))
}

/// Both readers' row counts of a read table.
fn rows(read: &Value) -> (u64, u64) {
    (
        read["pyiceberg"]["rows"].as_u64().unwrap_or(0),
        read["duckdb"]["rows"].as_u64().unwrap_or(0),
    )
}

/// Data files under the warehouse that no snapshot of their table references.
fn leftovers(sandbox: &Sandbox) -> Vec<String> {
    let files = sandbox.data_files();
    let (rejects, target): (Vec<String>, Vec<String>) = files
        .into_iter()
        .partition(|f| f.contains("accounts__rejects/"));
    let mut left = Vec::new();
    for (table, files) in [(TABLE, target), (REJECTS, rejects)] {
        let read = sandbox.read_table_with(table, None, &["--references"]);
        left.extend(unreferenced(&files, &read).into_iter().cloned());
    }
    left
}

#[test]
fn failing_rows_go_to_the_rejects_table_and_the_others_are_published() {
    let sandbox = Sandbox::new();
    let data = sandbox.write("data/accounts.csv", ACCOUNTS);
    let exact = "[[check]]\nname = \"published\"\ntype = \"row_count\"\nmin = 4\nmax = 4\n";
    sandbox.spec(&spec(&data, "id, status, balance, email", exact));

    let (code, report, err) = run(&sandbox, "quarantine-1", None);
    assert_eq!(code, Some(0), "{report:#}\n{err}");
    // row_count counts the published rows.
    assert_eq!(report["rows"], 4, "{report:#}");
    assert_eq!(report["rejected_rows"], 2, "{report:#}");
    assert!(report["rejects_snapshot_id"].is_i64(), "{report:#}");
    let status = check(&report, "known_status");
    assert_eq!(status["quarantined"], true, "{status:#}");
    assert_eq!(status["failed_rows"], 1, "{status:#}");
    assert!(status["samples"][0].as_str().unwrap().contains("frozen"));
    // Row 4 fails both; it is set aside once, by the first check it fails.
    assert_eq!(check(&report, "balance_not_negative")["failed_rows"], 1);
    assert_eq!(check(&report, "email_present")["failed_rows"], 1);
    assert_eq!(check(&report, "published")["passed"], true);

    let target = sandbox.read_table(TABLE, None);
    assert_eq!(rows(&target), (4, 4), "{target:#}");
    assert_eq!(
        target["snapshots"][0]["summary"]["nightshift.rejected-rows"],
        "2"
    );
    let rejects = sandbox.read_table(REJECTS, None);
    assert_eq!(rows(&rejects), (2, 2), "{rejects:#}");
    assert_eq!(
        rejects["pyiceberg"]["columns"],
        serde_json::json!([
            "id", "status", "balance", "email", "__check", "__reason", "__job_id"
        ])
    );
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(
            first_rows(&rejects[reader]),
            [
                r#"[4, "frozen", -7, "d@example.com", "known_status", "fails \"status\" IN ('open', 'closed')", "quarantine-1"]"#,
                r#"[6, "closed", -1, "ünï@example.com", "balance_not_negative", "fails \"balance\" >= 0", "quarantine-1"]"#,
            ],
            "{reader}: {rejects:#}"
        );
    }
    let summary = &rejects["snapshots"][0]["summary"];
    assert_eq!(summary["nightshift.job-id"], "quarantine-1", "{summary:#}");
    assert_eq!(summary["nightshift.rejects-of"], TABLE, "{summary:#}");

    // The same job again: both commits are found, nothing is added.
    let (code, report, err) = run(&sandbox, "quarantine-1", None);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(report["already_committed"], true, "{report:#}");
    assert_eq!(snapshot_count(&sandbox.read_table(REJECTS, None)), 1);

    // A failed error check publishes neither the rows nor the rejects.
    let too_many = "[[check]]\nname = \"published\"\ntype = \"row_count\"\nmin = 100\n";
    sandbox.spec(&spec(&data, "id, status, balance, email", too_many));
    let (code, report, _) = run(&sandbox, "quarantine-2", None);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["kind"], "checks_failed", "{report:#}");
    assert_eq!(snapshot_count(&sandbox.read_table(TABLE, None)), 1);
    assert_eq!(snapshot_count(&sandbox.read_table(REJECTS, None)), 1);
    assert_eq!(leftovers(&sandbox), Vec::<String>::new());

    // A new result column reaches the rejects table too (added in its commit).
    sandbox.spec(&spec(&data, "id, status, balance, email, 'x' AS note", ""));
    let (code, report, err) = run(&sandbox, "quarantine-3", None);
    assert_eq!(code, Some(0), "{report:#}\n{err}");
    let rejects = sandbox.read_table(REJECTS, None);
    assert_eq!(rows(&rejects), (4, 4), "{rejects:#}");
    assert_eq!(
        rejects["pyiceberg"]["columns"],
        serde_json::json!([
            "id", "status", "balance", "email", "__check", "__reason", "__job_id", "note"
        ])
    );
    assert_eq!(rows(&sandbox.read_table(TABLE, None)), (8, 8));
}

#[test]
fn a_crash_between_the_two_commits_is_finished_by_the_rerun() {
    let sandbox = Sandbox::new();
    let data = sandbox.write("data/accounts.csv", ACCOUNTS);
    sandbox.spec(&spec(&data, "id, status, balance, email", ""));

    // The rejects land, then the process dies before the target's commit.
    let (code, _, err) = run(
        &sandbox,
        "crash-between",
        Some("coordinator-between-commits=return"),
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("coordinator-between-commits"), "{err}");
    assert_eq!(snapshot_count(&sandbox.read_table(REJECTS, None)), 1);
    assert_eq!(snapshot_count(&sandbox.read_table(TABLE, None)), 0);

    // The rerun commits the target; its own rejects are not committed a second time.
    let (code, report, err) = run(&sandbox, "crash-between", None);
    assert_eq!(code, Some(0), "{report:#}\n{err}");
    assert_eq!(rows(&sandbox.read_table(TABLE, None)), (4, 4));
    let rejects = sandbox.read_table(REJECTS, None);
    assert_eq!(snapshot_count(&rejects), 1, "{rejects:#}");
    assert_eq!(rows(&rejects), (2, 2), "{rejects:#}");
    // The aborted run's target files and the rerun's rejects files are swept.
    assert_eq!(leftovers(&sandbox), Vec::<String>::new());
}

/// A job whose every row was set aside commits only its rejects. Its rerun on changed input
/// set other rows aside, which were reported but dropped (the job id's rejects are
/// committed once): it is refused, and a rerun on the same input goes on.
#[test]
fn a_rerun_that_sets_other_rows_aside_than_its_committed_rejects_is_refused() {
    let sandbox = Sandbox::new();
    let all_bad = "id,status,balance,email\n7,frozen,1,x@example.com\n8,open,-2,ÿ@example.com\n";
    let data = sandbox.write("data/accounts.csv", all_bad);
    sandbox.spec(&spec(&data, "id, status, balance, email", ""));
    let (code, report, err) = run(&sandbox, "all-aside", None);
    assert_eq!(code, Some(0), "{report:#}\n{err}");
    assert_eq!(report["rejected_rows"], 2, "{report:#}");
    assert_eq!(rows(&sandbox.read_table(REJECTS, None)), (2, 2));

    sandbox.write(
        "data/accounts.csv",
        "id,status,balance,email\n7,open,1,x@example.com\n8,open,-2,ÿ@example.com\n",
    );
    let (code, report, err) = run(&sandbox, "all-aside", None);
    assert_eq!(code, Some(2), "{report:#}\n{err}");
    assert!(
        err.contains("set 2 rows aside in `tests.accounts__rejects`")
            && err.contains("this run sets 1 aside")
            && err.contains("new job id"),
        "{err}"
    );
    let rejects = sandbox.read_table(REJECTS, None);
    assert_eq!(snapshot_count(&rejects), 1, "{rejects:#}");
    assert_eq!(rows(&rejects), (2, 2), "{rejects:#}");

    // Under its own job id the corrected input lands, its one bad row set aside.
    let (code, report, err) = run(&sandbox, "all-aside-fixed", None);
    assert_eq!(code, Some(0), "{report:#}\n{err}");
    assert_eq!(rows(&sandbox.read_table(TABLE, None)), (1, 1));
    assert_eq!(rows(&sandbox.read_table(REJECTS, None)), (3, 3));
    assert!(leftovers(&sandbox).is_empty(), "{:?}", leftovers(&sandbox));
}

#[test]
fn quarantine_is_refused_where_it_cannot_set_rows_aside() {
    let sandbox = Sandbox::new();
    let data = sandbox.write("data/accounts.csv", ACCOUNTS);
    for (extra, says) in [
        (
            "[[check]]\nname = \"one_each\"\ntype = \"unique\"\ncolumns = [\"id\"]\non_fail = \"quarantine\"\n",
            "not to type = \"unique\"",
        ),
        (
            "[[check]]\nname = \"src\"\non = \"accounts\"\ntype = \"not_null\"\ncolumns = [\"id\"]\non_fail = \"quarantine\"\n",
            "not to a check on source `accounts`",
        ),
    ] {
        sandbox.spec(&spec(&data, "id, status, balance, email", extra));
        let out = sandbox.cli(&["validate", "pipeline.toml"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
    }
    let merging = spec(&data, "id, status, balance, email", "").replace(
        "schema_evolution = \"add_columns\"",
        "mode = \"merge\"\nmerge_keys = [\"id\"]",
    );
    sandbox.spec(&merging);
    let out = sandbox.cli(&["validate", "pipeline.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("does not apply to mode = \"merge\""), "{err}");
    // A result column named like one the rejects table keeps is refused before any task.
    sandbox.spec(&spec(
        &data,
        "id, status, balance, email, 'x' AS __reason",
        "",
    ));
    let (code, _, err) = run(&sandbox, "clash", None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`__reason`"), "{err}");
    assert_eq!(snapshot_count(&sandbox.read_table(TABLE, None)), 0);
    // `validate` finds it too (it passed).
    sandbox.spec(&spec(&data, "id, status, balance, email, 1 AS __check", ""));
    let out = sandbox.cli(&["validate", "pipeline.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the result has a column `__check`, which the rejects table keeps"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_workers_set_the_rows_aside() {
    let cluster = ClusterSandbox::start(ClusterStorage::LocalWithPostgres, 2, &[]);
    let data = cluster.sandbox.write("data/accounts.csv", ACCOUNTS);
    cluster
        .sandbox
        .spec(&spec(&data, "id, status, balance, email", ""));
    let outcome = cluster.submit("quarantine-cluster", &[]);
    assert_eq!(
        outcome["status"],
        "succeeded",
        "{outcome:#}\n{}",
        cluster.logs()
    );
    assert_eq!(rows(&cluster.read_table(TABLE, None)), (4, 4));
    let rejects = cluster.read_table(REJECTS, None);
    assert_eq!(rows(&rejects), (2, 2), "{rejects:#}");
    assert_eq!(
        rejects["snapshots"][0]["summary"]["nightshift.job-id"],
        "quarantine-cluster"
    );
}

/// An overwrite whose every row a check quarantines fails and leaves the table as it was:
/// it used to commit, replacing the table's rows with none.
#[test]
fn an_overwrite_of_only_quarantined_rows_keeps_the_table() {
    let sandbox = Sandbox::new();
    let data = sandbox.write("data/accounts.csv", ACCOUNTS);
    let overwrite = spec(&data, "id, status, balance, email", "").replace(
        "schema_evolution = \"add_columns\"",
        "schema_evolution = \"add_columns\"\nmode = \"overwrite\"",
    );
    sandbox.spec(&overwrite);
    let (code, report, err) = run(&sandbox, "overwrite-1", None);
    assert_eq!(code, Some(0), "{report:#}\n{err}");
    assert_eq!(report["rows"], 4, "{report:#}");

    sandbox.write(
        "data/accounts.csv",
        "id,status,balance,email\n7,frozen,1,x@example.com\n8,open,-2,ÿ@example.com\n",
    );
    let (code, report, err) = run(&sandbox, "overwrite-2", None);
    assert_eq!(code, Some(1), "{report:#}\n{err}");
    assert!(
        err.contains("quarantined every one of the 2 row(s)")
            && err.contains("nothing was committed"),
        "{err}"
    );
    let target = sandbox.read_table(TABLE, None);
    assert_eq!(rows(&target), (4, 4), "{target:#}");
    assert_eq!(snapshot_count(&target), 1, "{target:#}");
    assert_eq!(snapshot_count(&sandbox.read_table(REJECTS, None)), 1);
    assert!(leftovers(&sandbox).is_empty(), "{:?}", leftovers(&sandbox));
}

/// `overwrite_partitions` replaces the partitions of the rows it set aside too: a partition
/// whose new rows all went to the rejects table kept its old rows beside the other
/// partitions' new ones (the table mixed two loads, exit 0). A run whose every row is set
/// aside is refused, as an overwrite's is.
#[test]
fn a_partition_overwrite_replaces_the_partitions_of_the_rows_set_aside() {
    let sandbox = Sandbox::new();
    let data = sandbox.write("data/accounts.csv", ACCOUNTS);
    let by_status = spec(&data, "id, status, balance, email", "").replace(
        "schema_evolution = \"add_columns\"",
        "schema_evolution = \"add_columns\"\nmode = \"overwrite_partitions\"\npartition_by = [\"status\"]",
    );
    sandbox.spec(&by_status);
    let (code, report, err) = run(&sandbox, "by-status-1", None);
    assert_eq!(code, Some(0), "{report:#}\n{err}");
    // open: 1, 2, 5; closed: 3 (6 is set aside).
    assert_eq!(report["rows"], 4, "{report:#}");

    // The next load: 1 again for `open`, and `closed`'s one row set aside.
    sandbox.write(
        "data/accounts.csv",
        "id,status,balance,email\n1,open,11,a@example.com\n9,closed,-5,ç@example.com\n",
    );
    let (code, report, err) = run(&sandbox, "by-status-2", None);
    assert_eq!(code, Some(0), "{report:#}\n{err}");
    assert_eq!(
        (&report["rows"], &report["rejected_rows"]),
        (&1.into(), &1.into())
    );
    let target = sandbox.read_table(TABLE, None);
    assert_eq!(rows(&target), (1, 1), "{target:#}");
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(
            first_rows(&target[reader]),
            [r#"[1, "open", 11, "a@example.com"]"#],
            "{reader}: {target:#}"
        );
    }

    // Every row set aside: refused, both tables as they were.
    sandbox.write(
        "data/accounts.csv",
        "id,status,balance,email\n1,open,-1,a@example.com\n",
    );
    let (code, _, err) = run(&sandbox, "by-status-3", None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("every partition it loaded empty"), "{err}");
    assert_eq!(rows(&sandbox.read_table(TABLE, None)), (1, 1));
    assert_eq!(snapshot_count(&sandbox.read_table(REJECTS, None)), 2);
    assert!(leftovers(&sandbox).is_empty(), "{:?}", leftovers(&sandbox));
}
