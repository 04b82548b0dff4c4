//! Nightly write patterns: `mode = "overwrite_partitions"` replaces exactly the partitions a
//! run's result has rows in, and `nightshift backfill` runs one job per day, resumably.

use std::collections::BTreeMap;

use nightshift_coordinator::JobReport;
use nightshift_tests::{Sandbox, snapshot_count, unread, unreferenced};
use serde_json::Value;

const TABLE: &str = "tests.daily";

/// Events of `days` days (2024-01-01 on), `per_day` rows each, amounts scaled by `version`
/// so a rerun with late data is told apart from the first run.
fn write_events(sandbox: &Sandbox, days: u32, per_day: u32, version: u32) {
    let mut csv = String::from("id,event_date,amount\n");
    for d in 0..days {
        for r in 0..per_day {
            csv.push_str(&format!(
                "{},2024-01-{:02},{}\n",
                d * 1000 + r,
                d + 1,
                (r + 1) * version
            ));
        }
    }
    sandbox.write("data/events.csv", csv);
}

fn spec(mode: &str) -> String {
    format!(
        r#"[pipeline]
name = "daily"

[params]
from = "2024-01-01"
to = "2024-01-01"

[[source]]
name = "events"
format = "csv"
location = "data/events.csv"
[source.schema]
id = "bigint not null"
event_date = "date"
amount = "bigint"

[transform]
sql = "SELECT id, event_date, amount FROM events WHERE event_date BETWEEN DATE '${{from}}' AND DATE '${{to}}'"

[target]
table = "{TABLE}"
mode = "{mode}"
partition_by = ["day(event_date)"]
"#
    )
}

/// Rows and amount total per day, read by PyIceberg with DuckDB agreeing.
fn per_day(sandbox: &Sandbox) -> (BTreeMap<String, (u64, u64)>, Value) {
    let read = sandbox.read_table_with(TABLE, None, &["--references"]);
    assert_eq!(
        read["pyiceberg"]["checksum"], read["duckdb"]["checksum"],
        "{read:#}"
    );
    let files = sandbox.data_files();
    assert_eq!(unreferenced(&files, &read), Vec::<&String>::new());
    let script = format!(
        "import duckdb, duckdb_extensions, json, sys\n\
         for e in ('avro','iceberg'): duckdb_extensions.import_extension(e)\n\
         from pyiceberg.catalog.sql import SqlCatalog\n\
         w = '{w}'\n\
         t = SqlCatalog('nightshift', uri=f'sqlite:///{{w}}/catalog.db', warehouse=w).load_table('{TABLE}')\n\
         c = duckdb.connect(); c.execute('LOAD iceberg')\n\
         rows = c.execute(\"SELECT CAST(event_date AS VARCHAR), COUNT(*), SUM(amount) FROM iceberg_scan(?) GROUP BY 1 ORDER BY 1\", [t.metadata_location]).fetchall()\n\
         json.dump({{r[0]: [r[1], int(r[2])] for r in rows}}, sys.stdout)\n",
        w = sandbox.warehouse().display()
    );
    let days: BTreeMap<String, (u64, u64)> = nightshift_tests::python_json(&script, &[]);
    (days, read)
}

/// The data files of one day's partition.
fn files_of(sandbox: &Sandbox, day: &str) -> Vec<String> {
    sandbox
        .data_files()
        .into_iter()
        .filter(|f| f.contains(&format!("={day}/")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_partitions_replaces_exactly_the_days_a_run_touches() {
    let sandbox = Sandbox::new();
    write_events(&sandbox, 3, 10, 1);
    sandbox.spec(&spec("overwrite_partitions"));
    fn day(d: &str) -> [(&str, &str); 2] {
        [("from", d), ("to", d)]
    }

    for d in ["2024-01-01", "2024-01-02"] {
        sandbox
            .run_with(2, Some(2), Some(&format!("daily-{d}")), &day(d))
            .await
            .expect(d);
    }
    let (days, _) = per_day(&sandbox);
    assert_eq!(days.len(), 2, "{days:?}");
    assert_eq!(days["2024-01-01"], (10, 55));
    let day2_files = files_of(&sandbox, "2024-01-02");
    assert!(!day2_files.is_empty(), "{:?}", sandbox.data_files());

    // Late data for day 1: a rerun (another job id) replaces day 1 only.
    write_events(&sandbox, 3, 12, 2);
    sandbox
        .run_with(
            2,
            Some(2),
            Some("daily-2024-01-01-late"),
            &day("2024-01-01"),
        )
        .await
        .expect("rerun");
    let (days, read) = per_day(&sandbox);
    assert_eq!(days["2024-01-01"], (12, 156));
    assert_eq!(days["2024-01-02"], (10, 55), "day 2 must be untouched");
    assert_eq!(files_of(&sandbox, "2024-01-02").len(), day2_files.len());
    assert_eq!(snapshot_count(&read), 3);
    let last = &read["snapshots"][2];
    assert_eq!(last["operation"], "overwrite", "{last:#}");
    assert_eq!(last["summary"]["total-records"], "22", "{last:#}");

    // The same rerun again: the same content, one more snapshot.
    sandbox
        .run_with(
            2,
            Some(2),
            Some("daily-2024-01-01-again"),
            &day("2024-01-01"),
        )
        .await
        .expect("rerun again");
    let (again, read) = per_day(&sandbox);
    assert_eq!(again, days);
    assert_eq!(snapshot_count(&read), 4);

    // One run touching two days replaces both and leaves the first.
    sandbox
        .run_with(
            2,
            Some(2),
            Some("daily-two-days"),
            &[("from", "2024-01-02"), ("to", "2024-01-03")],
        )
        .await
        .expect("two days");
    let (days, _) = per_day(&sandbox);
    assert_eq!(days["2024-01-01"], (12, 156));
    assert_eq!(days["2024-01-02"], (12, 156));
    assert_eq!(days["2024-01-03"], (12, 156));
    assert_ne!(files_of(&sandbox, "2024-01-02"), day2_files);

    // An empty result replaces nothing and commits nothing.
    let empty = sandbox
        .run_with(
            2,
            Some(2),
            Some("daily-empty"),
            &[("from", "2023-01-01"), ("to", "2023-01-01")],
        )
        .await
        .expect("empty");
    assert_eq!(empty.snapshot_id, None);
    let (after, read) = per_day(&sandbox);
    assert_eq!(after, days);
    assert_eq!(snapshot_count(&read), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_commits_one_snapshot_per_day_and_resumes() {
    let sandbox = Sandbox::new();
    write_events(&sandbox, 10, 5, 1);
    sandbox.spec(&spec("overwrite_partitions").replace(
        "sql = \"SELECT id, event_date, amount FROM events WHERE event_date BETWEEN DATE '${from}' AND DATE '${to}'\"",
        "sql = \"SELECT id, event_date, amount FROM events WHERE event_date = DATE '${from}'\"",
    ));
    // The first half, as if the backfill had been stopped midway.
    let first = sandbox.cli(&[
        "backfill",
        "pipeline.toml",
        "--param-range",
        "from=2024-01-01..2024-01-05",
    ]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let all = sandbox.cli(&[
        "backfill",
        "pipeline.toml",
        "--param-range",
        "from=2024-01-01..2024-01-10",
        "--parallel",
        "2",
        "--output",
        "json",
    ]);
    assert!(
        all.status.success(),
        "{}",
        String::from_utf8_lossy(&all.stderr)
    );
    let outcomes: Value = serde_json::from_slice(&all.stdout).unwrap();
    let statuses: Vec<&str> = outcomes["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses[..5], ["skipped"; 5], "{outcomes:#}");
    assert_eq!(statuses[5..], ["committed"; 5], "{outcomes:#}");
    let (days, read) = per_day(&sandbox);
    assert_eq!(days.len(), 10, "{days:?}");
    assert!(days.values().all(|d| *d == (5, 15)), "{days:?}");
    assert_eq!(snapshot_count(&read), 10);

    // A fix to the SQL: the same backfill is refused at its first value, which the code
    // before committed, and says how to redo it; under a new --run-id every value is
    // redone with the fixed SQL, each value's outcome printed as it ends.
    sandbox.spec(&spec("overwrite_partitions").replace(
        "sql = \"SELECT id, event_date, amount FROM events WHERE event_date BETWEEN DATE '${from}' AND DATE '${to}'\"",
        "sql = \"SELECT id, event_date, amount * 2 AS amount FROM events WHERE event_date = DATE '${from}'\"",
    ));
    let backfill = |extra: &[&str]| {
        let range = [
            "backfill",
            "pipeline.toml",
            "--param-range",
            "from=2024-01-01..2024-01-10",
        ];
        sandbox.cli(&[&range[..], extra].concat())
    };
    let refused = backfill(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("for a backfill, a new --run-id"),
        "{stderr}"
    );
    let redone = backfill(&["--run-id", "fix-1"]);
    let stderr = String::from_utf8_lossy(&redone.stderr);
    assert!(redone.status.success(), "{stderr}");
    assert!(
        stderr.contains("from=2024-01-01: committed (5 rows, job backfill-")
            && stderr.contains("-fix-1-from-2024-01-10)"),
        "{stderr}"
    );
    let (days, read) = per_day(&sandbox);
    assert_eq!(days.len(), 10, "{days:?}");
    assert!(days.values().all(|d| *d == (5, 30)), "{days:?}");
    assert_eq!(snapshot_count(&read), 20);

    // A redo of an append target would add every row again beside the first: refused.
    sandbox.spec(&spec("append").replace("tests.daily", "tests.appended"));
    let refused = backfill(&["--run-id", "fix-2"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("a second time beside the first"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Partitions coarser than the values: each day would replace the month before it.
    sandbox.spec(
        &spec("overwrite_partitions")
            .replace("tests.daily", "tests.monthly")
            .replace("day(event_date)", "month(event_date)")
            .replace(
                "BETWEEN DATE '${from}' AND DATE '${to}'",
                "= DATE '${from}'",
            ),
    );
    let refused = backfill(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_ne!(refused.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("from=2024-01-01: committed")
            && stderr.contains(
                "backfill value from=2024-01-02 would replace rows committed by value from=2024-01-01 (job backfill-daily-from-2024-01-01)"
            ),
        "{stderr}"
    );
    let read = sandbox.read_table("tests.monthly", None);
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
    assert_eq!(read["pyiceberg"]["rows"], 5, "{read:#}");

    // Once the snapshot that added the first value's file has expired, its file's name
    // still says whose rows it holds: the next value is refused again (it replaced the
    // month, and only the last value's rows stayed). Another pipeline's append first, so
    // that expiry has a newer snapshot to keep.
    let monthly = |mode: &str| {
        spec(mode)
            .replace("tests.daily", "tests.monthly")
            .replace("day(event_date)", "month(event_date)")
            .replace(
                "BETWEEN DATE '${from}' AND DATE '${to}'",
                "= DATE '${from}'",
            )
    };
    sandbox.spec(&monthly("append").replace("name = \"daily\"", "name = \"late\""));
    let late = sandbox.cli(&["run", "pipeline.toml", "--param", "from=2024-01-05"]);
    assert!(
        late.status.success(),
        "{}",
        String::from_utf8_lossy(&late.stderr)
    );
    sandbox.maintain(
        "tests.monthly",
        &["--expire-older-than", "0s", "--keep-last", "1"],
    );
    sandbox.spec(&monthly("overwrite_partitions"));
    // The second value alone, refused: it would replace the first value's rows.
    let second_value_is_refused = || {
        let refused = sandbox.cli(&[
            "backfill",
            "pipeline.toml",
            "--param-range",
            "from=2024-01-02..2024-01-02",
        ]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_ne!(refused.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains(
                "backfill value from=2024-01-02 would replace rows committed by value from=2024-01-01 (job backfill-daily-from-2024-01-01)"
            ),
            "{stderr}"
        );
    };
    second_value_is_refused();
    let read = sandbox.read_table("tests.monthly", None);
    assert_eq!(
        (snapshot_count(&read), &read["pyiceberg"]["rows"]),
        (1, &10.into()),
        "{read:#}"
    );

    // A compaction rewrites the first value's file with the other pipeline's under its own
    // name; the footer's list of jobs still says whose rows it holds (the value went through
    // and replaced the month).
    let compacted = sandbox.cli(&["maintain", "tests.monthly", "--compact"]);
    let out = String::from_utf8_lossy(&compacted.stdout);
    assert!(
        compacted.status.success() && out.contains("compacted 2 small file(s)"),
        "{out}{}",
        String::from_utf8_lossy(&compacted.stderr)
    );
    second_value_is_refused();
    // A redo of the first value replaces its own rows and the other pipeline's in the file
    // the compaction wrote: that pipeline is no backfill of this one.
    let redo = sandbox.cli(&[
        "backfill",
        "pipeline.toml",
        "--param-range",
        "from=2024-01-01..2024-01-01",
        "--run-id",
        "redo",
    ]);
    assert!(
        redo.status.success(),
        "{}",
        String::from_utf8_lossy(&redo.stderr)
    );
    let read = sandbox.read_table("tests.monthly", None);
    assert_eq!(read["pyiceberg"]["rows"], 5, "{read:#}");

    // A full overwrite is refused: each day would replace the one before.
    sandbox.spec(&spec("overwrite"));
    let refused = sandbox.cli(&[
        "backfill",
        "pipeline.toml",
        "--param-range",
        "from=2024-01-01..2024-01-02",
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("overwrite_partitions"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// A backfill's job ids name the pipeline: resumed after a rename, it finds the values
/// committed under the old name (an append target got them twice).
#[test]
fn a_backfill_resumed_after_a_rename_skips_what_it_committed() {
    let sandbox = Sandbox::new();
    write_events(&sandbox, 3, 2, 1);
    let daily = spec("append").replace(
        "BETWEEN DATE '${from}' AND DATE '${to}'",
        "= DATE '${from}'",
    );
    sandbox.spec(&daily);
    let backfill = |last: &str| {
        let out = sandbox.cli(&[
            "backfill",
            "pipeline.toml",
            "--param-range",
            &format!("from=2024-01-01..{last}"),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    backfill("2024-01-02");
    sandbox.spec(&daily.replace(
        "name = \"daily\"",
        "name = \"daily events\"\nprevious_names = [\"daily\"]",
    ));
    let stderr = backfill("2024-01-03");
    assert!(
        stderr.contains("from=2024-01-01: skipped")
            && stderr.contains("from=2024-01-03: committed"),
        "{stderr}"
    );
    let (days, _) = per_day(&sandbox);
    assert!(days.values().all(|d| d.0 == 2), "{days:?}");
    assert_eq!(days.len(), 3, "{days:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintain_expires_snapshots_and_removes_only_old_unreferenced_files() {
    let sandbox = Sandbox::new();
    sandbox.spec(&spec("overwrite"));
    for run in 1..=4 {
        write_events(&sandbox, 2, 5, run);
        sandbox
            .run_with(
                2,
                Some(2),
                Some(&format!("rebuild-{run}")),
                &[("from", "2024-01-01"), ("to", "2024-01-02")],
            )
            .await
            .expect("rebuild");
    }
    let read = sandbox.read_table_with(TABLE, None, &["--references"]);
    assert_eq!(snapshot_count(&read), 4);
    let committed_files = sandbox.data_files().len();

    // An old orphan (a crashed writer's file, two days old) and a young one (a job still
    // writing): only the old one may go. An age below a day is refused.
    let data_dir = sandbox.warehouse().join("tests/daily/data");
    let old = data_dir.join("crashed-s1-p0-a1-deadbeef-00000.parquet");
    let young = data_dir.join("running-s1-p0-a1-cafebabe-00000.parquet");
    std::fs::write(&old, b"not committed").unwrap();
    std::fs::write(&young, b"not committed yet").unwrap();
    let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(day_ago)
        .unwrap();

    let maintain = |args: &[&str]| sandbox.maintain(TABLE, args);
    let refused = sandbox.cli(&["maintain", TABLE, "--remove-orphans-older-than", "1h"]);
    assert!(!refused.status.success());
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert!(refusal.contains("at least 1d"), "{refusal}");
    assert!(old.exists() && young.exists());
    let dry = maintain(&[
        "--expire-older-than",
        "0s",
        "--keep-last",
        "2",
        "--remove-orphans-older-than",
        "1d",
        "--dry-run",
    ]);
    assert_eq!(
        dry["expired_snapshots"].as_array().unwrap().len(),
        2,
        "{dry:#}"
    );
    assert_eq!(dry["orphans"].as_array().unwrap().len(), 1, "{dry:#}");
    assert!(old.exists() && young.exists());
    assert_eq!(snapshot_count(&sandbox.read_table(TABLE, None)), 4);

    let done = maintain(&[
        "--expire-older-than",
        "0s",
        "--keep-last",
        "2",
        "--remove-orphans-older-than",
        "1d",
    ]);
    assert_eq!(done["expired_snapshots"], dry["expired_snapshots"]);
    assert!(
        done["files_deleted_by_expiry"].as_u64().unwrap() > 0,
        "{done:#}"
    );
    assert!(!old.exists(), "the old orphan is removed");
    assert!(young.exists(), "a file younger than the safety age stays");
    std::fs::remove_file(&young).unwrap();

    let read = sandbox.read_table_with(TABLE, None, &["--every-snapshot", "--references"]);
    assert_eq!(snapshot_count(&read), 2);
    for snapshot in read["by_snapshot"].as_array().unwrap() {
        assert_eq!(snapshot["pyiceberg"]["rows"], 10, "{read:#}");
        assert_eq!(
            snapshot["pyiceberg"]["checksum"],
            snapshot["duckdb"]["checksum"]
        );
    }
    // Every file left is one a remaining snapshot reads: the two expired rebuilds' files
    // are gone, including those the remaining snapshots name only as replaced (DELETED).
    let files = sandbox.data_files();
    assert!(files.len() < committed_files, "{files:?}");
    assert_eq!(unread(&files, &read), Vec::<&String>::new(), "{read:#}");
    let (days, _) = per_day(&sandbox);
    assert_eq!(days["2024-01-01"], (5, 60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_rewrites_small_files_per_partition_and_keeps_a_concurrent_append() {
    let sandbox = Sandbox::new();
    sandbox.spec(&spec("append"));
    let two_days = [("from", "2024-01-01"), ("to", "2024-01-02")];
    for run in 1..=3 {
        write_events(&sandbox, 2, 5, run);
        sandbox
            .run_with(2, Some(2), Some(&format!("load-{run}")), &two_days)
            .await
            .expect("append");
    }
    let (before, _) = per_day(&sandbox);
    let small = files_of(&sandbox, "2024-01-01").len() + files_of(&sandbox, "2024-01-02").len();
    assert!(files_of(&sandbox, "2024-01-01").len() >= 3);

    let maintain = |args: &[&str], failpoints: &str| {
        let mut cmd = std::process::Command::new(nightshift_tests::nightshift_bin());
        cmd.args(["maintain", TABLE, "--output", "json"])
            .args(args)
            .current_dir(sandbox.path(""))
            .env("FAILPOINTS", failpoints)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };
    let finish = |child: std::process::Child| {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let dry = finish(maintain(&["--compact", "--dry-run"], ""));
    assert_eq!(dry["compacted"]["partitions"], 2, "{dry:#}");
    assert_eq!(dry["compacted"]["files_rewritten"], small, "{dry:#}");
    assert_eq!(dry["compacted"]["snapshot_id"], Value::Null);
    assert_eq!(sandbox.data_files().len(), small);

    // Compaction holds before its commit, its files written; meanwhile a run appends a day.
    let compacting = maintain(&["--compact"], "compact-before-commit=sleep(6000)");
    let started = std::time::Instant::now();
    while !sandbox.data_files().iter().any(|f| f.contains("/compact-")) {
        assert!(started.elapsed().as_secs() < 60, "compaction wrote nothing");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    write_events(&sandbox, 3, 5, 10);
    sandbox
        .run_with(
            1,
            Some(1),
            Some("late-append"),
            &[("from", "2024-01-03"), ("to", "2024-01-03")],
        )
        .await
        .expect("append during compaction");
    let done = finish(compacting);
    assert_eq!(done["compacted"]["files_rewritten"], small, "{done:#}");
    assert_eq!(done["compacted"]["files_written"], 2, "{done:#}");

    // The same rows, the appended day kept, one file per compacted day.
    let (after, read) = per_day(&sandbox);
    let mut expected = before.clone();
    expected.insert("2024-01-03".into(), (5, 150));
    assert_eq!(after, expected);
    let snapshots = read["snapshots"].as_array().unwrap();
    let last = snapshots.last().unwrap();
    assert_eq!(last["operation"], "replace", "{last:#}");
    assert_eq!(last["summary"]["nightshift.maintenance"], "compact");
    assert_eq!(last["summary"]["deleted-data-files"], small.to_string());
    assert_eq!(last["summary"]["added-data-files"], "2");
    assert_eq!(
        snapshots[snapshots.len() - 2]["summary"]["nightshift.job-id"],
        "late-append",
        "the append landed while compaction ran"
    );
    assert_eq!(last["summary"]["total-data-files"], "3", "{last:#}");

    // Nothing left to compact. Expiry to the compaction's snapshot keeps the rows and
    // deletes the replaced small files (that snapshot names them only as DELETED): the
    // two compacted files and the late append are all that is left.
    let again = finish(maintain(&["--compact"], ""));
    assert_eq!(again["compacted"]["partitions"], 0, "{again:#}");
    let expired = finish(maintain(
        &["--expire-older-than", "0s", "--keep-last", "1"],
        "",
    ));
    assert!(
        expired["files_deleted_by_expiry"].as_u64().unwrap() >= small as u64,
        "{expired:#}"
    );
    assert_eq!(per_day(&sandbox).0, expected);
    let files = sandbox.data_files();
    let read = sandbox.read_table_with(TABLE, None, &["--references"]);
    assert_eq!(files.len(), 3, "{files:?}");
    assert_eq!(unread(&files, &read), Vec::<&String>::new(), "{read:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_policies_live_in_the_spec() {
    let sandbox = Sandbox::new();
    let two_days = [("from", "2024-01-01"), ("to", "2024-01-02")];
    sandbox.spec(&spec("append"));
    for run in 1..=3 {
        write_events(&sandbox, 2, 5, run);
        sandbox
            .run_with(2, Some(2), Some(&format!("load-{run}")), &two_days)
            .await
            .expect("append");
    }
    let small = sandbox.data_files().len();
    let maintain = |args: &[&str]| {
        let out = sandbox.cli(&[&["maintain", "--output", "json"], args].concat());
        let json = serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null);
        (
            out.status.code(),
            json,
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    // No policy in the spec and no flag: nothing to do, said so.
    let (code, _, err) = maintain(&["--spec", "pipeline.toml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("has no [maintenance] policy"), "{err}");

    sandbox.spec(&format!(
        "{}\n[maintenance]\ncompact = true\nmin_input_files = 2\nexpire_older_than = \"0s\"\nkeep_last = 1\n",
        spec("append")
    ));
    let (code, dry, err) = maintain(&["--spec", "pipeline.toml", "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(dry["compacted"]["partitions"], 2, "{dry:#}");
    assert_eq!(dry["compacted"]["files_rewritten"], small, "{dry:#}");
    assert_eq!(sandbox.data_files().len(), small);
    let (code, done, err) = maintain(&["--spec", "pipeline.toml"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(done["compacted"]["files_written"], 2, "{done:#}");
    let read = sandbox.read_table(TABLE, None);
    let snapshots = read["snapshots"].as_array().unwrap();
    assert_eq!(snapshots.len(), 1, "expired to the newest: {read:#}");
    assert_eq!(snapshots[0]["operation"], "replace");
    assert_eq!(read["pyiceberg"]["rows"], 30);

    // A flag overrides the spec: a minimum no partition reaches compacts nothing.
    let (code, again, err) = maintain(&["--spec", "pipeline.toml", "--min-input-files", "99"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(again["compacted"]["partitions"], 0, "{again:#}");

    // Another table than the spec's target, and an age that is not one, are refused.
    let (code, _, err) = maintain(&["other.table", "--spec", "pipeline.toml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("publishes to {TABLE}, not other.table")),
        "{err}"
    );
    sandbox.spec(&format!(
        "{}\n[maintenance]\nexpire_older_than = \"a week\"\n",
        spec("append")
    ));
    let (code, _, err) = maintain(&["--spec", "pipeline.toml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("expire_older_than = \"a week\" is not an age"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_overtaken_by_an_overwrite_fails_and_deletes_only_its_own_files() {
    let sandbox = Sandbox::new();
    sandbox.spec(&spec("append"));
    let two_days = [("from", "2024-01-01"), ("to", "2024-01-02")];
    for run in 1..=2 {
        write_events(&sandbox, 2, 5, run);
        sandbox
            .run_with(2, Some(2), Some(&format!("load-{run}")), &two_days)
            .await
            .expect("append");
    }
    let mut compacting = std::process::Command::new(nightshift_tests::nightshift_bin());
    let compacting = compacting
        .args(["maintain", TABLE, "--compact"])
        .current_dir(sandbox.path(""))
        .env("FAILPOINTS", "compact-before-commit=sleep(6000)")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !sandbox.data_files().iter().any(|f| f.contains("/compact-")) {
        assert!(started.elapsed().as_secs() < 60, "compaction wrote nothing");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A rerun of day 1 replaces the files compaction is rewriting.
    sandbox.spec(&spec("overwrite_partitions"));
    write_events(&sandbox, 2, 5, 7);
    sandbox
        .run_with(
            1,
            Some(1),
            Some("rerun-day-1"),
            &[("from", "2024-01-01"), ("to", "2024-01-01")],
        )
        .await
        .expect("rerun during compaction");
    let out = compacting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no longer in the table"), "{stderr}");
    // Its own files are gone, every committed one is there, the rows are the rerun's.
    assert!(
        !sandbox.data_files().iter().any(|f| f.contains("/compact-")),
        "{:?}",
        sandbox.data_files()
    );
    let (days, read) = per_day(&sandbox);
    assert_eq!(days["2024-01-01"], (5, 105));
    assert_eq!(days["2024-01-02"], (10, 45));
    assert_eq!(
        read["snapshots"].as_array().unwrap().last().unwrap()["operation"],
        "overwrite"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_partitions_past_the_age_as_one_delete_snapshot() {
    let sandbox = Sandbox::new();
    sandbox.spec(&spec("append"));
    write_events(&sandbox, 3, 5, 1);
    sandbox
        .run_with(
            2,
            Some(2),
            Some("three-days"),
            &[("from", "2024-01-01"), ("to", "2024-01-03")],
        )
        .await
        .expect("load");
    // A cut-off at 2024-01-03T00:00: days 1 and 2 have ended by then, day 3 has not.
    let jan_3 = 1_704_240_000; // 2024-01-03T00:00:00Z
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let age = format!("{}s", now - jan_3);
    let maintain = |extra: &[&str]| {
        let mut args = vec![
            "maintain",
            TABLE,
            "--output",
            "json",
            "--drop-partitions-older-than",
            &age,
        ];
        args.extend_from_slice(extra);
        let out = sandbox.cli(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let dry = maintain(&["--dry-run"]);
    assert_eq!(
        dry["dropped"]["partitions"],
        serde_json::json!(["event_date_day=2024-01-01", "event_date_day=2024-01-02"]),
        "{dry:#}"
    );
    assert_eq!(dry["dropped"]["rows"], 10);
    assert_eq!(dry["dropped"]["snapshot_id"], Value::Null);
    assert_eq!(per_day(&sandbox).0.len(), 3);

    let done = maintain(&[]);
    assert_eq!(done["dropped"]["data_files"], 2, "{done:#}");
    let (days, read) = per_day(&sandbox);
    assert_eq!(
        days.into_iter().collect::<Vec<_>>(),
        [("2024-01-03".to_string(), (5, 15))]
    );
    let snapshots = read["snapshots"].as_array().unwrap();
    assert_eq!(snapshots.len(), 2);
    assert_eq!(snapshots[1]["operation"], "delete");
    assert_eq!(snapshots[1]["summary"]["deleted-records"], "10");
    // The load's snapshot still reads all three days (time travel), both readers agreeing.
    let every = sandbox.read_table_with(TABLE, None, &["--every-snapshot"]);
    let first = &every["by_snapshot"][0];
    assert_eq!(first["pyiceberg"]["rows"], 15, "{first:#}");
    assert_eq!(first["pyiceberg"]["checksum"], first["duckdb"]["checksum"]);

    let again = maintain(&[]);
    assert_eq!(
        again["dropped"]["partitions"],
        serde_json::json!([]),
        "{again:#}"
    );
    assert_eq!(
        snapshot_count(&sandbox.read_table(TABLE, None)),
        2,
        "nothing to drop commits nothing"
    );
}

#[test]
fn backfill_on_a_cluster_submits_each_day_and_resumes() {
    let cluster = backfill_cluster();
    let config = cluster.config.display().to_string();
    assert_backfill_resumes(
        &cluster,
        &["--cluster", config.as_str(), "--wait-secs", "120"],
    );
}

#[test]
fn backfill_through_the_job_api_submits_each_day_under_its_id_and_resumes() {
    let cluster = backfill_cluster();
    cluster.wait_for_api();
    let api = cluster.api_url();
    // The same ids again: the API answers with the committed jobs; only new days run.
    assert_backfill_resumes(&cluster, &["--api", api.as_str()]);

    // A committed job id with another request is refused, naming the job.
    let day_one = "backfill-daily-from-2024-01-01";
    let out = cluster.api_command(&[
        "submit",
        "pipeline.toml",
        "--job-id",
        day_one,
        "--param",
        "from=2024-01-09",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("job `{day_one}` is succeeded with another spec")),
        "{err}"
    );
    // The same request under that id gets the job back, queueing nothing.
    let out = cluster.api_command(&[
        "submit",
        "pipeline.toml",
        "--job-id",
        day_one,
        "--param",
        "from=2024-01-01",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), day_one);
    assert_eq!(snapshot_count(&cluster.read_table(TABLE, None)), 4);
}

/// A cluster with one worker and the day-by-day events pipeline.
fn backfill_cluster() -> nightshift_tests::cluster::ClusterSandbox {
    use nightshift_tests::cluster::{ClusterSandbox, ClusterStorage};
    let cluster = ClusterSandbox::start(ClusterStorage::LocalWithPostgres, 1, &[]);
    write_events(&cluster.sandbox, 4, 5, 1);
    let events = cluster
        .sandbox
        .path("data/events.csv")
        .display()
        .to_string();
    cluster.sandbox.spec(
        &spec("overwrite_partitions")
            .replace(
                "sql = \"SELECT id, event_date, amount FROM events WHERE event_date BETWEEN DATE '${from}' AND DATE '${to}'\"",
                "sql = \"SELECT id, event_date, amount FROM events WHERE event_date = DATE '${from}'\"",
            )
            .replace("location = \"data/events.csv\"", &format!("location = \"{events}\"")),
    );
    cluster
}

/// `nightshift backfill` over `range` with `backend` arguments: each value's status.
fn backfill_on(
    cluster: &nightshift_tests::cluster::ClusterSandbox,
    range: &str,
    backend: &[&str],
) -> Vec<String> {
    let out = std::process::Command::new(nightshift_tests::nightshift_bin())
        .args(["backfill", "pipeline.toml", "--param-range", range])
        .args(backend)
        .args(["--output", "json"])
        .current_dir(cluster.sandbox.path(""))
        .env("NIGHTSHIFT_TOKEN", &cluster.api_token)
        .env_remove("RUST_LOG")
        .output()
        .expect("run nightshift backfill");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let outcomes: Value = serde_json::from_slice(&out.stdout).unwrap();
    outcomes["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["status"].as_str().unwrap().to_string())
        .collect()
}

/// Two days backfilled through `backend`, then four (the first two skipped): four
/// snapshots and the rows of four days, read alike by PyIceberg and DuckDB.
fn assert_backfill_resumes(cluster: &nightshift_tests::cluster::ClusterSandbox, backend: &[&str]) {
    assert_eq!(
        backfill_on(cluster, "from=2024-01-01..2024-01-02", backend),
        ["committed"; 2]
    );
    assert_eq!(
        backfill_on(cluster, "from=2024-01-01..2024-01-04", backend),
        ["skipped", "skipped", "committed", "committed"]
    );
    let read = cluster.read_table(TABLE, None);
    assert_eq!(snapshot_count(&read), 4, "{read:#}");
    assert_eq!(read["pyiceberg"]["rows"], 20);
    assert_eq!(read["pyiceberg"]["checksum"], read["duckdb"]["checksum"]);
}

/// `SELECT id, v FROM table ORDER BY id` as DuckDB reads the table (PyIceberg agreeing).
fn ids_and_values(sandbox: &Sandbox, table: &str) -> Vec<(i64, i64)> {
    let read = sandbox.read_table(table, None);
    assert_eq!(
        read["pyiceberg"]["checksum"], read["duckdb"]["checksum"],
        "{read:#}"
    );
    let script = format!(
        "import duckdb, duckdb_extensions, json, sys\n\
         for e in ('avro','iceberg'): duckdb_extensions.import_extension(e)\n\
         from pyiceberg.catalog.sql import SqlCatalog\n\
         w = '{w}'\n\
         t = SqlCatalog('nightshift', uri=f'sqlite:///{{w}}/catalog.db', warehouse=w).load_table('{table}')\n\
         c = duckdb.connect(); c.execute('LOAD iceberg')\n\
         json.dump(c.execute('SELECT id, v FROM iceberg_scan(?) ORDER BY id', [t.metadata_location]).fetchall(), sys.stdout)\n",
        w = sandbox.warehouse().display()
    );
    nightshift_tests::python_json(&script, &[])
}

fn merge_spec(keys: &str) -> String {
    format!(
        r#"[pipeline]
name = "accounts"

[[source]]
name = "changes"
format = "csv"
location = "data/changes.csv"
[source.schema]
id = "bigint"
v = "bigint"
op = "varchar"

[transform]
sql = "SELECT id, v, op FROM changes"

[target]
table = "tests.accounts"
mode = "merge"
{keys}
delete_when = "op = 'D'"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_updates_inserts_and_deletes_by_key() {
    let sandbox = Sandbox::new();
    sandbox.spec(&merge_spec("merge_keys = [\"id\"]"));
    // The first merge creates the table: every change is an insert (deletes of keys the
    // table does not hold do nothing).
    sandbox.write(
        "data/changes.csv",
        "id,v,op\n1,10,U\n2,20,U\n3,30,U\n4,40,U\n5,50,U\n9,90,D\n",
    );
    sandbox
        .run(2, Some(2), Some("merge-1"))
        .await
        .expect("first merge");
    assert_eq!(
        ids_and_values(&sandbox, "tests.accounts"),
        [(1, 10), (2, 20), (3, 30), (4, 40), (5, 50)]
    );
    // Update 2, delete 3, insert 6; the rest stays. Staged, as a cluster runs it: the
    // anti-join and the key check cross shuffles.
    sandbox.write("data/changes.csv", "id,v,op\n2,21,U\n3,0,D\n6,60,I\n");
    let report = sandbox.run_staged(2, Some(3)).await.expect("second merge");
    assert!(report.snapshot_id.is_some());
    assert_eq!(
        ids_and_values(&sandbox, "tests.accounts"),
        [(1, 10), (2, 21), (4, 40), (5, 50), (6, 60)]
    );
    let read = sandbox.read_table("tests.accounts", None);
    assert_eq!(snapshot_count(&read), 2);
    assert_eq!(read["snapshots"][1]["operation"], "overwrite");

    // A key twice in the result fails the job, naming the key; nothing is committed.
    sandbox.write("data/changes.csv", "id,v,op\n7,70,I\n4,41,U\n4,42,U\n");
    let err = sandbox
        .run(2, Some(2), Some("merge-3"))
        .await
        .expect_err("duplicate key")
        .to_string();
    assert!(err.contains("key (4)") && err.contains("2 rows"), "{err}");
    // A null key too.
    sandbox.write("data/changes.csv", "id,v,op\n,70,I\n");
    let err = sandbox
        .run(2, Some(2), Some("merge-4"))
        .await
        .expect_err("null key")
        .to_string();
    assert!(err.contains("merge key id is null"), "{err}");
    assert_eq!(
        snapshot_count(&sandbox.read_table("tests.accounts", None)),
        2
    );
    assert_eq!(
        ids_and_values(&sandbox, "tests.accounts"),
        [(1, 10), (2, 21), (4, 40), (5, 50), (6, 60)]
    );

    // A merge without keys is refused before anything runs.
    sandbox.spec(&merge_spec(""));
    let err = sandbox
        .run(2, Some(2), Some("merge-5"))
        .await
        .expect_err("no keys")
        .to_string();
    assert!(err.contains("merge_keys"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_compares_keys_as_the_table_stores_them() {
    let sandbox = Sandbox::new();
    sandbox.spec(&merge_spec("merge_keys = [\"id\"]"));
    sandbox.write("data/changes.csv", "id,v,op\n7,70,U\n8,80,U\n");
    sandbox
        .run(2, Some(2), Some("typed-1"))
        .await
        .expect("first merge");
    // A string key '007' is not compared as text with the stored bigint 7 (which kept 7
    // and added '007' as a second key 7): refused as an append's string would be.
    let typed = |id: &str, v: &str| {
        merge_spec("merge_keys = [\"id\"]")
            .replace("id = \"bigint\"", &format!("id = \"{id}\""))
            .replace("v = \"bigint\"", &format!("v = \"{v}\""))
    };
    sandbox.spec(&typed("varchar", "bigint"));
    sandbox.write("data/changes.csv", "id,v,op\n007,71,U\n");
    let err = sandbox
        .run(2, Some(2), Some("typed-2"))
        .await
        .expect_err("a string key")
        .to_string();
    assert!(
        err.contains("id") && err.contains("CAST it in the SQL"),
        "{err}"
    );
    // A double 7.9 is not stored in the bigint column as 7.
    sandbox.spec(&typed("bigint", "double"));
    sandbox.write("data/changes.csv", "id,v,op\n7,7.9,U\n");
    let err = sandbox
        .run(2, Some(2), Some("typed-3"))
        .await
        .expect_err("a double value")
        .to_string();
    assert!(err.contains("CAST it in the SQL"), "{err}");
    // An int key replaces its stored bigint row.
    sandbox.spec(&typed("int", "int"));
    sandbox.write("data/changes.csv", "id,v,op\n7,72,U\n");
    sandbox
        .run(2, Some(2), Some("typed-4"))
        .await
        .expect("an int key");
    assert_eq!(
        ids_and_values(&sandbox, "tests.accounts"),
        [(7, 72), (8, 80)]
    );

    // Timestamps in nanoseconds (a SQL CAST gives them) equal to the microsecond the table
    // stores are one key.
    sandbox.spec(
        &merge_spec("merge_keys = [\"at\"]")
            .replace("id = \"bigint\"", "at = \"varchar\"")
            .replace(
                "SELECT id, v, op",
                "SELECT CAST(at AS TIMESTAMP) AS at, v, op",
            )
            .replace("tests.accounts", "tests.by_time"),
    );
    sandbox.write(
        "data/changes.csv",
        "at,v,op\n2024-01-01T00:00:00.000007,1,U\n",
    );
    sandbox
        .run(2, Some(2), Some("time-1"))
        .await
        .expect("first merge");
    sandbox.write(
        "data/changes.csv",
        "at,v,op\n2024-01-01T00:00:00.000008001,2,U\n2024-01-01T00:00:00.000008002,3,U\n",
    );
    let err = sandbox
        .run(2, Some(2), Some("time-2"))
        .await
        .expect_err("one key twice")
        .to_string();
    assert!(
        err.contains("2024-01-01T00:00:00.000008) in 2 rows"),
        "{err}"
    );
    sandbox.write(
        "data/changes.csv",
        "at,v,op\n2024-01-01T00:00:00.000007001,4,U\n",
    );
    sandbox
        .run(2, Some(2), Some("time-3"))
        .await
        .expect("a changed row");
    let read = sandbox.read_table("tests.by_time", None);
    assert_eq!(read["pyiceberg"]["rows"], 1, "{read:#}");
}

/// The data files of `table`'s current snapshot, by PyIceberg.
fn live_files(sandbox: &Sandbox, table: &str) -> Vec<String> {
    let script = format!(
        "import json, sys\n\
         from pyiceberg.catalog.sql import SqlCatalog\n\
         w = '{w}'\n\
         t = SqlCatalog('nightshift', uri=f'sqlite:///{{w}}/catalog.db', warehouse=w).load_table('{table}')\n\
         json.dump(sorted(t.inspect.files().column('file_path').to_pylist()), sys.stdout)\n",
        w = sandbox.warehouse().display()
    );
    nightshift_tests::python_json(&script, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_rewrites_only_the_files_that_may_hold_a_changed_key() {
    let sandbox = Sandbox::new();
    sandbox.spec(&merge_spec("merge_keys = [\"id\"]"));
    sandbox.write("data/changes.csv", "id,v,op\n1,10,U\n2,20,U\n3,30,U\n");
    sandbox
        .run(1, Some(1), Some("low"))
        .await
        .expect("first merge");
    let low = live_files(&sandbox, "tests.accounts");
    assert_eq!(low.len(), 1, "{low:?}");
    // Keys far from the first file's: nothing to rewrite, an append.
    sandbox.write("data/changes.csv", "id,v,op\n100,1000,I\n101,1010,I\n");
    sandbox
        .run(1, Some(1), Some("high"))
        .await
        .expect("insert-only merge");
    let both = live_files(&sandbox, "tests.accounts");
    assert_eq!(both.len(), 2, "{both:?}");
    assert!(both.contains(&low[0]));
    let read = sandbox.read_table("tests.accounts", None);
    assert_eq!(read["snapshots"][1]["operation"], "append", "{read:#}");

    // An update of key 3: only the low file may hold it, only it is rewritten.
    sandbox.write("data/changes.csv", "id,v,op\n3,33,U\n");
    sandbox
        .run(1, Some(1), Some("update-3"))
        .await
        .expect("update merge");
    let after = live_files(&sandbox, "tests.accounts");
    let high: Vec<&String> = both.iter().filter(|f| **f != low[0]).collect();
    assert!(after.contains(high[0]), "the high file stays: {after:?}");
    assert!(
        !after.contains(&low[0]),
        "the low file is rewritten: {after:?}"
    );
    let read = sandbox.read_table("tests.accounts", None);
    let last = &read["snapshots"][2];
    assert_eq!(last["operation"], "overwrite", "{last:#}");
    assert_eq!(last["summary"]["deleted-data-files"], "1");
    assert_eq!(last["summary"]["deleted-records"], "3");
    assert_eq!(
        ids_and_values(&sandbox, "tests.accounts"),
        [(1, 10), (2, 20), (3, 33), (100, 1000), (101, 1010)]
    );
    // Keys 2 and 101: their range spans every file, so every file is rewritten.
    sandbox.write("data/changes.csv", "id,v,op\n2,22,U\n101,0,D\n");
    sandbox.run_staged(2, Some(2)).await.expect("staged merge");
    assert_eq!(
        ids_and_values(&sandbox, "tests.accounts"),
        [(1, 10), (2, 22), (3, 33), (100, 1000)]
    );
    let read = sandbox.read_table("tests.accounts", None);
    assert_eq!(
        read["snapshots"][3]["summary"]["deleted-data-files"],
        after.len().to_string()
    );
}

#[test]
fn compaction_on_a_cluster_runs_as_a_job_on_the_workers() {
    use nightshift_tests::cluster::{ClusterSandbox, ClusterStorage};
    let cluster = ClusterSandbox::start(ClusterStorage::LocalWithPostgres, 2, &[]);
    let events = cluster.sandbox.path("data/events.csv");
    cluster.sandbox.spec(&spec("append").replace(
        "location = \"data/events.csv\"",
        &format!("location = \"{}\"", events.display()),
    ));
    for run in 1..=3 {
        write_events(&cluster.sandbox, 2, 5, run);
        let outcome = cluster.submit(
            &format!("load-{run}"),
            &[("from", "2024-01-01"), ("to", "2024-01-02")],
        );
        assert_eq!(outcome["status"], "succeeded", "{outcome}");
    }
    let before = cluster.read_table(TABLE, None);
    let small = cluster.sandbox.data_files().len();
    assert!(small >= 6, "{small} files");

    let maintain = || {
        let out = std::process::Command::new(nightshift_tests::nightshift_bin())
            .args([
                "maintain",
                TABLE,
                "--compact",
                "--output",
                "json",
                "--cluster",
            ])
            .arg(&cluster.config)
            .current_dir(cluster.sandbox.path(""))
            .env_remove("RUST_LOG")
            .output()
            .expect("run nightshift maintain");
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let done = maintain();
    assert_eq!(done["compacted"]["partitions"], 2, "{done:#}");
    assert_eq!(done["compacted"]["files_rewritten"], small, "{done:#}");
    assert_eq!(done["compacted"]["files_written"], 2, "{done:#}");
    assert!(done["compacted"]["snapshot_id"].is_i64(), "{done:#}");
    // The workers did the rewrite: a task of the compaction job ran on one of them.
    assert!(
        (0..2).any(|i| cluster.worker_log(i).contains("compact-job-")),
        "{}",
        cluster.logs()
    );

    // The same rows, read alike by PyIceberg and DuckDB; one replace snapshot holding one
    // file per day.
    let after = cluster.read_table(TABLE, None);
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(after[reader]["rows"], 30, "{after:#}");
        assert_eq!(
            after[reader]["checksum"], before["pyiceberg"]["checksum"],
            "{after:#}"
        );
    }
    let snapshots = after["snapshots"].as_array().unwrap();
    let last = snapshots.last().unwrap();
    assert_eq!(snapshots.len(), 4, "{after:#}");
    assert_eq!(last["operation"], "replace", "{last:#}");
    assert_eq!(last["summary"]["nightshift.maintenance"], "compact");
    assert_eq!(last["summary"]["deleted-data-files"], small.to_string());
    assert_eq!(last["summary"]["total-data-files"], "2", "{last:#}");
    // Each day's file lists in its footer the jobs whose rows it holds (each load wrote both
    // days), so a backfill value's overwrite still knows them.
    let compacted: Vec<String> = cluster
        .sandbox
        .data_files()
        .into_iter()
        .filter(|f| f.contains("compact-job-"))
        .collect();
    assert_eq!(compacted.len(), 2, "{compacted:?}");
    for file in &compacted {
        assert_eq!(
            rows_of_jobs_in_footer(&cluster.sandbox.warehouse().join(file)).as_deref(),
            Some("[\"load-1\",\"load-2\",\"load-3\"]"),
            "{file}"
        );
    }

    // Nothing is left to compact: no job is submitted.
    let again = maintain();
    assert_eq!(again["compacted"]["partitions"], 0, "{again:#}");
    assert_eq!(again["compacted"]["snapshot_id"], Value::Null);
    assert_eq!(snapshot_count(&cluster.read_table(TABLE, None)), 4);
}

/// The list of jobs a compaction's data file at `path` gives in its Parquet footer.
fn rows_of_jobs_in_footer(path: &std::path::Path) -> Option<String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    reader
        .metadata()
        .file_metadata()
        .key_value_metadata()?
        .iter()
        .find(|kv| kv.key == "nightshift.rows-of-jobs")?
        .value
        .clone()
}

/// A job whose snapshot a rollback took out of the table is not reported done again: its
/// rerun fails saying so (it used to report success without its rows), and under a new job
/// id the rows come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_of_a_rolled_back_job_says_its_rows_are_gone() {
    let sandbox = Sandbox::new();
    sandbox.spec(&spec("append"));
    write_events(&sandbox, 1, 3, 1);
    let day = [("from", "2024-01-01"), ("to", "2024-01-01")];
    let first = sandbox
        .run_with(2, Some(2), Some("day-1"), &day)
        .await
        .expect("first");
    sandbox
        .run_with(2, Some(2), Some("day-1-late"), &day)
        .await
        .expect("second");
    let rollback = format!(
        "t.manage_snapshots().rollback_to_snapshot({}).commit()\n\
         json.dump(len(t.scan().to_arrow()), sys.stdout)",
        first.snapshot_id.unwrap()
    );
    let rows: Value = sandbox.with_pyiceberg_table(TABLE, &rollback);
    assert_eq!(rows, 3);
    let err = sandbox
        .run_with(2, Some(2), Some("day-1-late"), &day)
        .await
        .expect_err("the rolled-back job is not done")
        .to_string();
    assert!(
        err.contains("rolled back") && err.contains("its own job id"),
        "{err}"
    );
    sandbox
        .run_with(2, Some(2), Some("day-1-late-again"), &day)
        .await
        .expect("under a new id");
    let read = sandbox.read_table(TABLE, None);
    assert_eq!(read["pyiceberg"]["rows"], 6, "{read:#}");
    assert_eq!(read["duckdb"]["rows"], 6, "{read:#}");
}

/// A sandbox whose spec appends one day of events (three rows a run).
fn appending_one_day() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.spec(&spec("append"));
    write_events(&sandbox, 1, 3, 1);
    sandbox
}

/// Runs [`appending_one_day`]'s day as `job`, which must succeed.
async fn append_the_day(sandbox: &Sandbox, job: &str) -> JobReport {
    let day = [("from", "2024-01-01"), ("to", "2024-01-01")];
    sandbox
        .run_with(2, Some(2), Some(job), &day)
        .await
        .expect(job)
}

/// A job whose snapshot expiry removed is still done: its rerun commits nothing (it used to
/// append its rows a second time, the history no longer naming it). So it stays past the
/// newest jobs the table's properties hold (it used to be forgotten after 100), through
/// orphan removal, and through a later expiry that writes the list anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_after_its_snapshot_expired_appends_nothing() {
    use nightshift_core::table::expired_jobs::MAX_INLINE;
    let sandbox = appending_one_day();
    let run = |job: String| {
        let sandbox = &sandbox;
        async move { append_the_day(sandbox, &job).await }
    };
    // Later jobs' ids start with the first's.
    let later: Vec<String> = (0..=MAX_INLINE).map(|n| format!("day-1-{n}")).collect();
    for job in std::iter::once("day-1".to_string()).chain(later.iter().cloned()) {
        run(job).await;
    }
    let maintain = |args: &[&str]| sandbox.maintain(TABLE, args);
    let expire = ["--expire-older-than", "0s", "--keep-last", "1"];
    let expired = maintain(&expire);
    assert_eq!(
        expired["expired_snapshots"].as_array().map(Vec::len),
        Some(MAX_INLINE + 1)
    );
    let rows = 3 * (MAX_INLINE + 2);
    let rerun_commits_nothing = |when: &'static str| {
        let run = &run;
        let sandbox = &sandbox;
        let later = &later;
        async move {
            for job in ["day-1", "day-1-0", later.last().unwrap().as_str()] {
                let again = run(job.to_string()).await;
                assert!(again.already_committed, "{job} {when}: {again:?}");
            }
            let read = sandbox.read_table(TABLE, None);
            assert_eq!(read["pyiceberg"]["rows"], rows, "{when}: {read:#}");
            assert_eq!(read["duckdb"]["rows"], rows, "{when}: {read:#}");
        }
    };
    rerun_commits_nothing("after expiry").await;

    // Orphan removal keeps the list the table names, however old.
    let metadata = sandbox.warehouse().join("tests/daily/metadata");
    let lists = || -> Vec<std::path::PathBuf> {
        let mut lists: Vec<_> = std::fs::read_dir(&metadata)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("nightshift-expired-jobs-"))
            .collect();
        lists.sort();
        lists
    };
    let age_metadata = || {
        let two_days_ago =
            std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
        for entry in std::fs::read_dir(&metadata).unwrap() {
            std::fs::File::options()
                .write(true)
                .open(entry.unwrap().path())
                .unwrap()
                .set_modified(two_days_ago)
                .unwrap();
        }
    };
    let first_list = lists();
    assert_eq!(first_list.len(), 1, "{first_list:?}");
    age_metadata();
    maintain(&["--remove-orphans-older-than", "1d"]);
    assert_eq!(lists(), first_list);
    rerun_commits_nothing("after orphan removal").await;

    // Another expiry writes a new list holding the old one's jobs; the old one is then an
    // orphan like any unreferenced file.
    run("day-2".to_string()).await;
    let rows = rows + 3;
    let expired = maintain(&expire);
    assert_eq!(
        expired["expired_snapshots"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(lists().len(), 2);
    age_metadata();
    maintain(&["--remove-orphans-older-than", "1d"]);
    let second_list = lists();
    assert_eq!(second_list.len(), 1);
    assert_ne!(second_list, first_list);
    let listed = std::fs::read_to_string(&second_list[0]).unwrap();
    assert_eq!(listed.lines().count(), MAX_INLINE + 2, "{listed}");
    for job in ["day-1", "day-1-0", "day-2"] {
        let again = run(job.to_string()).await;
        assert!(again.already_committed, "{job}: {again:?}");
    }
    let read = sandbox.read_table(TABLE, None);
    assert_eq!(read["pyiceberg"]["rows"], rows, "{read:#}");
    assert_eq!(snapshot_count(&read), 1, "{read:#}");

    // Another engine's orphan removal deletes the list (no Iceberg metadata names it): new
    // jobs still run, the newest expired ones are still known from the properties, and an
    // older one by its data files, still in the table.
    std::fs::remove_file(&second_list[0]).unwrap();
    assert!(!run("day-3".to_string()).await.already_committed);
    for job in ["day-1-19", "day-1"] {
        let again = run(job.to_string()).await;
        assert!(again.already_committed, "{job} without the list: {again:?}");
    }
}

/// Another engine's expiry records no job: a rerun of a job it expired, whose files are
/// still in the table, commits nothing (it appended its rows again). Jobs our own expiry
/// took stay known from our record; a new job still appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_after_another_engine_expired_its_snapshot_appends_nothing() {
    let sandbox = appending_one_day();
    let run = |job: &'static str| append_the_day(&sandbox, job);
    for job in ["ours-1", "theirs-1", "theirs-10", "kept"] {
        run(job).await;
    }
    sandbox.maintain(TABLE, &["--expire-older-than", "0s", "--keep-last", "3"]);
    let read = sandbox.read_table_with(TABLE, None, &["--expire-all-but-current"]);
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
    assert_eq!(read["pyiceberg"]["rows"], 12, "{read:#}");
    // `theirs-1`'s id is a prefix of `theirs-10`'s, whose files are also in the table.
    for job in ["ours-1", "theirs-1", "theirs-10", "kept"] {
        let again = run(job).await;
        assert!(again.already_committed, "{job}: {again:?}");
    }
    assert!(!run("new").await.already_committed);
    let read = sandbox.read_table(TABLE, None);
    assert_eq!(read["pyiceberg"]["rows"], 15, "{read:#}");
    assert_eq!(read["duckdb"]["rows"], 15, "{read:#}");
}

/// Nine runs appending to one table at once (a scheduler starting a backfill's days, or
/// pipelines feeding one table, together): each lands its rows once. One of ten used to fail
/// with a raw `CatalogCommitConflicts` once iceberg-rust's four retries, taken in lockstep by
/// every writer, had all lost; an append now retries on its own, each writer pausing apart.
#[test]
fn appends_started_together_each_land_once() {
    use std::process::{Command, Stdio};
    let sandbox = Sandbox::new();
    write_events(&sandbox, 10, 3, 1);
    sandbox.spec(&spec("append"));
    let day = |d: u32| format!("2024-01-{d:02}");
    let first = sandbox.cli(&[
        "run",
        "pipeline.toml",
        "--param",
        &format!("from={}", day(1)),
        "--param",
        &format!("to={}", day(1)),
    ]);
    assert!(first.status.success(), "{first:?}");
    let runs: Vec<_> = (2..=10)
        .map(|d| {
            Command::new(nightshift_tests::nightshift_bin())
                .args(["run", "pipeline.toml", "--param"])
                .arg(format!("from={}", day(d)))
                .arg("--param")
                .arg(format!("to={}", day(d)))
                .current_dir(sandbox.path(""))
                .env_remove("RUST_LOG")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run nightshift")
        })
        .collect();
    for run in runs {
        let out = run.wait_with_output().expect("run finished");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (days, read) = per_day(&sandbox);
    let expected: BTreeMap<String, (u64, u64)> = (1..=10).map(|d| (day(d), (3, 6))).collect();
    assert_eq!(days, expected, "{read:#}");
    assert_eq!(snapshot_count(&read), 10, "{read:#}");
}

/// After another engine changed the table's partition spec (month to day), a partition
/// overwrite of a day the old month files may hold is refused: it kept their old rows of
/// that day beside the new ones (each row twice, exit 0). A day they cannot hold, by their
/// bounds, is replaced as usual.
#[test]
fn a_partition_overwrite_over_files_of_an_earlier_spec_is_refused_where_they_may_hold_its_rows() {
    let sandbox = Sandbox::new();
    write_events(&sandbox, 6, 5, 1);
    let monthly = spec("overwrite_partitions").replace("day(event_date)", "month(event_date)");
    sandbox.spec(&monthly);
    let run = |from: &str, to: &str| {
        sandbox.cli(&[
            "run",
            "pipeline.toml",
            "--param",
            &format!("from={from}"),
            "--param",
            &format!("to={to}"),
        ])
    };
    let first = run("2024-01-01", "2024-01-02");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );

    let evolved: serde_json::Value = nightshift_tests::python_json(
        "import sys, json\n\
         from pyiceberg.catalog.sql import SqlCatalog\n\
         from pyiceberg.transforms import DayTransform\n\
         w = sys.argv[1]\n\
         t = SqlCatalog('nightshift', uri=f'sqlite:///{w}/catalog.db', warehouse=w).load_table(sys.argv[2])\n\
         with t.update_spec() as u:\n\
         \x20   u.remove_field(t.spec().fields[0].name)\n\
         \x20   u.add_field('event_date', DayTransform(), 'event_date_day')\n\
         json.dump(str(t.refresh().spec()), sys.stdout)\n",
        &[&sandbox.warehouse().display().to_string(), TABLE],
    );
    assert!(
        evolved.as_str().is_some_and(|s| s.contains("day")),
        "{evolved}"
    );
    sandbox.spec(&spec("overwrite_partitions"));

    // January 2nd is in the month file: refused, the table as it was.
    let refused = run("2024-01-02", "2024-01-02");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("written under an earlier partition spec of the table")
            && stderr.contains("Nothing was committed"),
        "{stderr}"
    );
    let (days, read) = per_day(&sandbox);
    assert_eq!(days.values().map(|d| d.0).sum::<u64>(), 10, "{days:?}");
    assert_eq!(snapshot_count(&read), 1, "{read:#}");

    // January 5th and 6th cannot be in it: written under the new spec, beside it.
    let later = run("2024-01-05", "2024-01-06");
    assert!(
        later.status.success(),
        "{}",
        String::from_utf8_lossy(&later.stderr)
    );
    let (days, _) = per_day(&sandbox);
    assert_eq!(days.len(), 4, "{days:?}");
    assert!(days.values().all(|d| *d == (5, 15)), "{days:?}");
}

/// Orphan removal through a stale copy of the catalog (a copied or restored `catalog.db`
/// still names the same table location) is refused: it took the files the live catalog
/// committed since the copy for orphans and deleted them, its newest metadata file with
/// them, and no reader could open the table any more.
#[test]
fn orphan_removal_through_a_stale_copy_of_the_catalog_is_refused() {
    let sandbox = Sandbox::new();
    write_events(&sandbox, 2, 5, 1);
    sandbox.spec(&spec("append"));
    let run = |day: &str| {
        let out = sandbox.cli(&[
            "run",
            "pipeline.toml",
            "--param",
            &format!("from={day}"),
            "--param",
            &format!("to={day}"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("2024-01-01");
    let stale = sandbox.path("stale");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::copy(
        sandbox.warehouse().join("catalog.db"),
        stale.join("catalog.db"),
    )
    .unwrap();
    run("2024-01-02");
    // Every file of the table two days old, past the orphan age.
    let two_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
    let mut dirs = vec![sandbox.warehouse().join("tests")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(two_days_ago)
                    .unwrap();
            }
        }
    }

    let refused = sandbox.cli(&[
        "maintain",
        TABLE,
        "--warehouse",
        &stale.display().to_string(),
        "--remove-orphans-older-than",
        "1d",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("a metadata file newer than the one this catalog has")
            && stderr.contains("Nothing was deleted"),
        "{stderr}"
    );
    let (days, _) = per_day(&sandbox);
    assert_eq!(days.len(), 2, "{days:?}");
    assert!(days.values().all(|d| *d == (5, 15)), "{days:?}");
}
