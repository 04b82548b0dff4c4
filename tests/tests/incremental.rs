//! Incremental Iceberg sources through the binary (embedded): upstream appends consumed over
//! several runs, a run that fails before its commit in between, a rerun with nothing new and
//! a rewritten upstream. Every upstream row lands downstream exactly once.

use std::process::Command;

use nightshift_tests::cluster::{ClusterSandbox, ClusterStorage};
use nightshift_tests::{Sandbox, nightshift_bin, python, snapshot_count};
use serde_json::Value;

const UPSTREAM: &str = "raw.events";
const DOWNSTREAM: &str = "curated.events";

/// The upstream loader: appends `<data>/batch_<batch>.csv` to `raw.events` (or replaces it).
fn loader_from(data: &str, mode: &str) -> String {
    format!(
        r#"[pipeline]
name = "loader"

[params]
batch = "1"

[[source]]
name = "batch"
format = "csv"
location = "{data}/batch_${{batch}}.csv"
schema = {{ id = "bigint not null", payload = "string" }}

[transform]
sql = "SELECT id, payload FROM batch"

[target]
table = "{UPSTREAM}"
mode = "{mode}"
"#
    )
}

/// The pipeline under test: reads `raw.events` incrementally into `curated.events`.
fn consumer(on_rewrite: Option<&str>) -> String {
    let on_rewrite = on_rewrite
        .map(|o| format!("on_source_rewrite = \"{o}\"\n"))
        .unwrap_or_default();
    format!(
        r#"[pipeline]
name = "curate"

[[source]]
name = "events"
format = "iceberg"
table = "{UPSTREAM}"
incremental = true
{on_rewrite}
[transform]
sql = "SELECT id, upper(payload) AS payload FROM events"

[target]
table = "{DOWNSTREAM}"
"#
    )
}

fn loader(mode: &str) -> String {
    loader_from("data", mode)
}

fn run(sandbox: &Sandbox, spec: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(nightshift_bin())
        .arg("run")
        .arg(spec)
        .args(args)
        .current_dir(sandbox.path(""))
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("run nightshift");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A sandbox with the upstream batches `data/batch_<n>.csv` (from 1), the loader appending
/// them and the consumer of `consumer_sql` (`None`: the usual one).
fn with_batches(batches: &[&str], consumer_sql: Option<&str>) -> Sandbox {
    let sandbox = Sandbox::new();
    for (n, rows) in batches.iter().enumerate() {
        sandbox.write(&format!("data/batch_{}.csv", n + 1), *rows);
    }
    sandbox.write("loader.toml", loader("append"));
    let spec = consumer(None);
    let spec = match consumer_sql {
        Some(sql) => spec.replace("SELECT id, upper(payload) AS payload FROM events", sql),
        None => spec,
    };
    sandbox.write("consumer.toml", spec);
    sandbox
}

fn load(sandbox: &Sandbox, batch: u32) {
    let (code, out) = run(
        sandbox,
        "loader.toml",
        &["--param", &format!("batch={batch}")],
        &[],
    );
    assert_eq!(code, 0, "loading batch {batch}: {out}");
}

fn consume(sandbox: &Sandbox, env: &[(&str, &str)]) -> (i32, String) {
    run(sandbox, "consumer.toml", &[], env)
}

/// The ids downstream, sorted, as PyIceberg reads them (duplicates kept).
fn downstream_ids(sandbox: &Sandbox) -> Vec<i64> {
    let script = "import sys, json\n\
        from pyiceberg.catalog import load_catalog\n\
        c = load_catalog('nightshift', type='sql', uri='sqlite:///' + sys.argv[1] + '/catalog.db', warehouse=sys.argv[1])\n\
        t = c.load_table(sys.argv[2]).scan().to_arrow()\n\
        print(json.dumps(sorted(t.column('id').to_pylist())))";
    let out = Command::new(python())
        .args(["-c", script])
        .arg(sandbox.warehouse())
        .arg(DOWNSTREAM)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ids")
}

fn summaries(sandbox: &Sandbox) -> Vec<Value> {
    let out = sandbox.cli(&["history", DOWNSTREAM, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout)
        .expect("history json")
        .into_iter()
        .map(|s| s["summary"].clone())
        .collect()
}

#[test]
fn upstream_appends_are_consumed_exactly_once_across_failures_and_reruns() {
    let sandbox = with_batches(
        &[
            "id,payload\n1,ä\n2,b\n3,c\n",
            "id,payload\n4,d\n5,é\n",
            "id,payload\n6,f\n7,g\n8,h\n",
            "id,payload\n9,i\n10,j\n",
        ],
        None,
    );

    // Two upstream appends, then the first run: everything so far.
    load(&sandbox, 1);
    load(&sandbox, 2);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), (1..=5).collect::<Vec<_>>());
    let first = &summaries(&sandbox)[0];
    assert_eq!(
        first["nightshift.consumed-after.raw.events"], "none",
        "{first}"
    );
    let consumed_first = first["nightshift.consumed.raw.events"]
        .as_str()
        .unwrap()
        .to_string();

    // A third append; the next run fails after its tasks wrote, before its commit.
    load(&sandbox, 3);
    let (code, out) = consume(
        &sandbox,
        &[("FAILPOINTS", "coordinator-before-commit=return")],
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("failpoint coordinator-before-commit"), "{out}");
    assert_eq!(downstream_ids(&sandbox), (1..=5).collect::<Vec<_>>());

    // The rerun reads the third append, and only it.
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), (1..=8).collect::<Vec<_>>());
    let second = &summaries(&sandbox)[0];
    assert_eq!(
        second["nightshift.consumed-after.raw.events"], consumed_first,
        "{second}"
    );
    assert!(
        second["nightshift.input.events"]
            .as_str()
            .is_some_and(|i| i.contains("1 appended snapshot(s) since the last run")),
        "{second}"
    );

    // Nothing new upstream: nothing read, nothing committed.
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    let read = sandbox.read_table(DOWNSTREAM, None);
    assert_eq!(snapshot_count(&read), 2, "{read:#}");

    // A fourth append is read alone.
    load(&sandbox, 4);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), (1..=10).collect::<Vec<_>>());
    let read = sandbox.read_table(DOWNSTREAM, None);
    assert_eq!(snapshot_count(&read), 3, "{read:#}");
    assert_eq!(read["pyiceberg"]["rows"], 10, "{read:#}");
    assert_eq!(read["duckdb"]["rows"], 10, "{read:#}");
}

/// An aggregate over nothing new still gives a row (`0`, NULL): the run commits nothing.
#[test]
fn an_aggregate_over_nothing_new_commits_nothing() {
    let sandbox = with_batches(
        &["id,payload\n1,a\n2,b\n"],
        Some("SELECT count(*) AS n, max(id) AS top FROM events"),
    );
    load(&sandbox, 1);
    for _ in 0..2 {
        let (code, out) = consume(&sandbox, &[]);
        assert_eq!(code, 0, "{out}");
    }
    let read = sandbox.read_table(DOWNSTREAM, None);
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
    assert_eq!(read["pyiceberg"]["rows"], 1, "{read:#}");
}

/// Three upstream batches of ids 1-2, 3 and 4: the first loaded and consumed, the second
/// loaded since.
fn consumed_once_then_loaded_again() -> Sandbox {
    let sandbox = with_batches(
        &[
            "id,payload\n1,a\n2,b\n",
            "id,payload\n3,c\n",
            "id,payload\n4,d\n",
        ],
        None,
    );
    load(&sandbox, 1);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    load(&sandbox, 2);
    sandbox
}

#[test]
fn a_renamed_pipeline_goes_on_where_it_stood_once_it_says_its_old_name() {
    let sandbox = consumed_once_then_loaded_again();

    // Renamed: its first run under the new name would read all of raw.events again.
    let renamed = consumer(None).replace("name = \"curate\"", "name = \"curate events ✓\"");
    sandbox.write("consumer.toml", &renamed);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("pipeline `curate` has (up to snapshot")
            && out.contains("previous_names = [\"curate\"]"),
        "{out}"
    );
    assert_eq!(downstream_ids(&sandbox), [1, 2]);

    // Saying its old name, it reads what was appended since, and goes on under the new one.
    sandbox.write(
        "consumer.toml",
        renamed.replace(
            "name = \"curate events ✓\"",
            "name = \"curate events ✓\"\nprevious_names = [\"curate\"]",
        ),
    );
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), [1, 2, 3]);
    load(&sandbox, 3);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), [1, 2, 3, 4]);
    assert_eq!(
        summaries(&sandbox)[0]["nightshift.pipeline"],
        "curate events ✓"
    );
}

/// An upstream table renamed (and the spec with it) is read on from the record made under
/// its old name, found by its snapshot: it was read whole again, and every row it held
/// landed downstream twice.
#[test]
fn a_table_renamed_upstream_is_read_on_from_where_it_stood() {
    let sandbox = consumed_once_then_loaded_again();

    let renamed = "raw.events_v2";
    let script = "import sys\n\
        from pyiceberg.catalog import load_catalog\n\
        c = load_catalog('nightshift', type='sql', uri='sqlite:///' + sys.argv[1] + '/catalog.db', warehouse=sys.argv[1])\n\
        c.rename_table(sys.argv[2], sys.argv[3])";
    let out = Command::new(python())
        .args(["-c", script])
        .arg(sandbox.warehouse())
        .args([UPSTREAM, renamed])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let to_renamed =
        |spec: String| spec.replace(&format!("\"{UPSTREAM}\""), &format!("\"{renamed}\""));
    sandbox.write("consumer.toml", to_renamed(consumer(None)));
    sandbox.write("loader.toml", to_renamed(loader("append")));

    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), [1, 2, 3]);
    // It read on after the snapshot its last run consumed under the old name.
    let history = summaries(&sandbox);
    assert_eq!(
        history[0][format!("nightshift.consumed-after.{renamed}")],
        history[1]["nightshift.consumed.raw.events"],
        "{history:#?}"
    );
    load(&sandbox, 3);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), [1, 2, 3, 4]);
}

/// Compaction upstream changes its files, not its rows: a consumer reads each appended row
/// once, before and after (it used to fail every later run: "rewrote the source").
/// Compaction and expiry of the consumer's own target keep its record of what it consumed
/// (the next run used to read everything again and append it twice).
#[test]
fn compaction_and_expiry_upstream_and_downstream_keep_each_row_once() {
    let sandbox = Sandbox::new();
    for (batch, ids) in [
        (1, 1..=3),
        (2, 4..=5),
        (3, 6..=8),
        (4, 9..=10),
        (5, 11..=12),
    ] {
        let rows: String = ids.map(|id| format!("{id},p{id}\n")).collect();
        sandbox.write(
            &format!("data/batch_{batch}.csv"),
            format!("id,payload\n{rows}"),
        );
    }
    sandbox.write("loader.toml", loader("append"));
    sandbox.write("consumer.toml", consumer(None));
    load(&sandbox, 1);
    load(&sandbox, 2);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");

    // Appended, then compacted (the append's file rewritten), then consumed.
    load(&sandbox, 3);
    let compacted = sandbox.maintain(UPSTREAM, &["--compact"]);
    assert_eq!(
        compacted["compacted"]["files_rewritten"], 3,
        "{compacted:#}"
    );
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), (1..=8).collect::<Vec<_>>());

    // Compacted with nothing appended since: nothing to read, nothing committed.
    load(&sandbox, 4);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    sandbox.maintain(UPSTREAM, &["--compact"]);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), (1..=10).collect::<Vec<_>>());
    assert_eq!(snapshot_count(&sandbox.read_table(DOWNSTREAM, None)), 3);

    // Downstream compacted, and every snapshot expired that expiry may take: the newest
    // one with the consumer's record stays, so the next run reads the fifth batch alone.
    let expiry = ["--compact", "--expire-older-than", "0s", "--keep-last", "1"];
    let maintained = sandbox.maintain(DOWNSTREAM, &expiry);
    assert_eq!(
        maintained["expired_snapshots"].as_array().map(Vec::len),
        Some(2),
        "{maintained:#}"
    );
    assert_eq!(downstream_ids(&sandbox), (1..=10).collect::<Vec<_>>());
    load(&sandbox, 5);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), (1..=12).collect::<Vec<_>>());
}

/// Upstream expiry after the next load (the nightly `expire older than a day`) removes the
/// snapshot a consumer last read; the snapshots after it are all left, so the consumer reads
/// on from there (every run used to fail: "no longer in the source's history"). When the
/// snapshots after it are gone too, what they appended is unknown: the run fails, nothing is
/// appended twice, and `on_source_rewrite = "full"` is named as the way on.
#[test]
fn an_upstream_expiry_of_the_consumed_snapshot_is_read_on_from() {
    let sandbox = Sandbox::new();
    for batch in 1..=4 {
        let id = batch * 10;
        sandbox.write(
            &format!("data/batch_{batch}.csv"),
            format!("id,payload\n{id},p{id}\n{},é\n", id + 1),
        );
    }
    sandbox.write("loader.toml", loader("append"));
    sandbox.write("consumer.toml", consumer(None));
    load(&sandbox, 1);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    load(&sandbox, 2);
    let expiry = ["--expire-older-than", "0s", "--keep-last", "1"];
    let expired = sandbox.maintain(UPSTREAM, &expiry);
    assert_eq!(
        expired["expired_snapshots"].as_array().map(Vec::len),
        Some(1),
        "{expired:#}"
    );
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), vec![10, 11, 20, 21]);

    // Two loads, and both the consumed snapshot and the one after it expired.
    load(&sandbox, 3);
    load(&sandbox, 4);
    sandbox.maintain(UPSTREAM, &expiry);
    let (code, out) = consume(&sandbox, &[]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("no longer in the source's history") && out.contains("on_source_rewrite"),
        "{out}"
    );
    assert_eq!(downstream_ids(&sandbox), vec![10, 11, 20, 21]);
}

#[test]
fn a_rewritten_upstream_fails_the_run_or_is_read_whole() {
    let sandbox = Sandbox::new();
    sandbox.write("data/batch_1.csv", "id,payload\n1,a\n2,b\n");
    sandbox.write("data/batch_2.csv", "id,payload\n3,c\n");
    sandbox.write("loader.toml", loader("append"));
    sandbox.write("consumer.toml", consumer(None));
    load(&sandbox, 1);
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");

    // Upstream replaced by an overwrite: the run refuses and names the snapshot.
    sandbox.write("loader.toml", loader("overwrite"));
    load(&sandbox, 2);
    let (code, out) = consume(&sandbox, &[]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("(overwrite) rewrote the source since the last run")
            && out.contains("on_source_rewrite = \"full\""),
        "{out}"
    );
    assert_eq!(downstream_ids(&sandbox), vec![1, 2]);

    // With on_source_rewrite = "full" it reads the whole current table.
    sandbox.write("consumer.toml", consumer(Some("full")));
    let (code, out) = consume(&sandbox, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(downstream_ids(&sandbox), vec![1, 2, 3]);

    // incremental is for Iceberg sources only; on_source_rewrite for incremental ones.
    sandbox.write(
        "bad.toml",
        "[pipeline]\nname = \"bad\"\n[[source]]\nname = \"b\"\nformat = \"csv\"\nlocation = \"data/batch_1.csv\"\nincremental = true\n[transform]\nsql = \"SELECT * FROM b\"\n[target]\ntable = \"x.y\"\n",
    );
    let out = sandbox.cli(&["validate", "bad.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("incremental = true needs format = \"iceberg\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_each_run_reads_what_was_appended_since_the_last() {
    let cluster = ClusterSandbox::start(ClusterStorage::LocalWithPostgres, 2, &[]);
    let sandbox = &cluster.sandbox;
    sandbox.write("data/batch_1.csv", "id,payload\n1,a\n2,b\n3,c\n");
    sandbox.write("data/batch_2.csv", "id,payload\n4,d\n5,e\n");
    let data = sandbox.path("data").display().to_string();
    let submit = |spec: &str, job: &str, params: &[(&str, &str)]| {
        sandbox.spec(spec);
        let outcome = cluster.submit(job, params);
        assert_eq!(
            outcome["status"],
            "succeeded",
            "{job}: {outcome:#}\n{}",
            cluster.logs()
        );
    };
    submit(&loader_from(&data, "append"), "load-1", &[("batch", "1")]);
    submit(&consumer(None), "curate-1", &[]);
    assert_eq!(cluster.read_table(DOWNSTREAM, None)["pyiceberg"]["rows"], 3);
    submit(&loader_from(&data, "append"), "load-2", &[("batch", "2")]);
    submit(&consumer(None), "curate-2", &[]);
    // 5, not 3 + 5: the second run read the second append only.
    let read = cluster.read_table(DOWNSTREAM, None);
    assert_eq!(read["pyiceberg"]["rows"], 5, "{read:#}");
    assert_eq!(snapshot_count(&read), 2, "{read:#}");
}
