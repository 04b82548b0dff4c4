//! Join strategies: broadcast joins of every kind give the reference rows when the probe side
//! runs as several tasks (Ballista's issue 1055: a broadcast left/full/semi/anti join emits
//! its unmatched build rows once per task), the spec's broadcast threshold changes the plan,
//! and a job under a small memory limit spills and gives the rows of an unlimited one. The
//! `ROW_NUMBER() ... WHERE rn <= K` dedupe (a per-key top K below the window) gives DuckDB's
//! rows both ways too.

use datafusion::prelude::SessionContext;
use nightshift::embedded::EmbeddedOptions;
use nightshift_coordinator::{JobOptions, validate_job};
use nightshift_core::ids::JobId;
use nightshift_core::session::MemorySettings;
use nightshift_tests::{Sandbox, assert_matches_reference};

/// `big` (3 files, 3,000 rows, keys 0..2999) and `small` (60 rows: keys -5..49, five of
/// them unmatched, and five null keys) as Parquet, so `small` is below the broadcast threshold
/// and `big` is scanned by several tasks.
async fn write_tables(sandbox: &Sandbox) {
    let ctx = SessionContext::new();
    std::fs::create_dir_all(sandbox.path("data/big")).unwrap();
    std::fs::create_dir_all(sandbox.path("data/small")).unwrap();
    for part in 0..3 {
        let sql = format!(
            "SELECT CAST(v AS BIGINT) AS k, CAST(v * 10 AS BIGINT) AS v FROM generate_series({}, {}) AS t(v)",
            part * 1000,
            part * 1000 + 999
        );
        let batches = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        nightshift_tests::write_parquet(
            &sandbox.path(&format!("data/big/part-{part}.parquet")),
            &batches,
        );
    }
    let sql = "SELECT CASE WHEN v >= 50 THEN NULL ELSE CAST(v AS BIGINT) END AS k, \
               CAST(v AS BIGINT) AS s FROM generate_series(-5, 54) AS t(v)";
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    nightshift_tests::write_parquet(&sandbox.path("data/small/small.parquet"), &batches);
}

/// Every join kind in one query, tagged, so one job and one read check them all. The
/// dangerous ones put `small` (the broadcast side) where its unmatched rows are emitted.
/// `small` is a scan the probing stage reads in place; the grouped one is a broadcast
/// stage of its own, read through shuffle files.
const EVERY_JOIN: &str = "
SELECT 'inner' AS kind, small.k AS small_k, small.s AS s, big.k AS big_k, big.v AS v
  FROM small JOIN big ON small.k = big.k
UNION ALL
SELECT 'small left', small.k, small.s, big.k, big.v FROM small LEFT JOIN big ON small.k = big.k
UNION ALL
SELECT 'big left', small.k, small.s, big.k, big.v FROM big LEFT JOIN small ON small.k = big.k
UNION ALL
SELECT 'big right', small.k, small.s, big.k, big.v FROM big RIGHT JOIN small ON small.k = big.k
UNION ALL
SELECT 'full', small.k, small.s, big.k, big.v FROM small FULL JOIN big ON small.k = big.k
UNION ALL
SELECT 'semi', small.k, small.s, CAST(NULL AS BIGINT) AS big_k, CAST(NULL AS BIGINT) AS v FROM small
  WHERE EXISTS (SELECT 1 FROM big WHERE big.k = small.k)
UNION ALL
SELECT 'anti', small.k, small.s, CAST(NULL AS BIGINT) AS big_k, CAST(NULL AS BIGINT) AS v FROM small
  WHERE NOT EXISTS (SELECT 1 FROM big WHERE big.k = small.k)
UNION ALL
SELECT 'not in', small.k, small.s, CAST(NULL AS BIGINT) AS big_k, CAST(NULL AS BIGINT) AS v FROM small
  WHERE small.k NOT IN (SELECT big.k FROM big WHERE big.k < 40)
UNION ALL
SELECT 'filtered left', small.k, small.s, big.k, big.v FROM small
  LEFT JOIN big ON small.k = big.k AND big.v > 100
UNION ALL
SELECT 'grouped inner', g.k, g.s, big.k, big.v
  FROM (SELECT k, CAST(COUNT(*) AS BIGINT) AS s FROM small GROUP BY k) g
  JOIN big ON g.k = big.k
";

fn spec(sql: &str, extra: &str) -> String {
    format!(
        r#"[pipeline]
name = "joins"

[[source]]
name = "big"
format = "parquet"
location = "data/big/"

[[source]]
name = "small"
format = "parquet"
location = "data/small/"

[transform]
sql = """
{sql}
"""

[target]
table = "tests.joins"
mode = "overwrite"
{extra}"#
    )
}

/// The rows of `sql` computed by DuckDB, as `reference.parquet`. Not DataFusion:
/// DataFusion 53 on one node gets [`EVERY_JOIN`] wrong (unmatched rows of `big LEFT JOIN small`
/// keep a value of `small.s`, an anti-join row goes missing), while DuckDB and DataFusion 55
/// agree with each other, and with Nightshift.
fn reference(sandbox: &Sandbox, sql: &str) -> std::path::PathBuf {
    let path = sandbox.path("reference.parquet");
    let script = format!(
        "import duckdb\ncon = duckdb.connect()\n\
         con.execute(\"CREATE VIEW big AS SELECT * FROM '{big}/*.parquet'\")\n\
         con.execute(\"CREATE VIEW small AS SELECT * FROM '{small}/*.parquet'\")\n\
         con.execute(\"\"\"COPY ({sql}) TO '{out}' (FORMAT parquet)\"\"\")\n",
        big = sandbox.path("data/big").display(),
        small = sandbox.path("data/small").display(),
        out = path.display(),
    );
    let status = std::process::Command::new(nightshift_tests::python())
        .arg("-c")
        .arg(script)
        .status()
        .expect("run python3 with duckdb");
    assert!(status.success(), "duckdb reference failed");
    path
}

async fn plan_of(sandbox: &Sandbox) -> String {
    let spec = nightshift_spec::load_spec(&sandbox.path("pipeline.toml"), &[]).unwrap();
    let options = JobOptions {
        job_id: JobId::generate(),
        workers: 2,
        target_task_bytes: None,
        partitions: Some(3),
        max_task_attempts: None,
    };
    validate_job(&spec, &options, None)
        .await
        .expect("validate")
        .plan
        .describe()
}

/// Runs the sandbox's spec (whose SQL is `sql`) twice and checks both tables against
/// DuckDB's rows of `sql`: once as stages exchanging through shuffle files, three tasks per
/// stage (the cluster's plan), once as one in-process stage shared by three tasks
/// (DataFusion's own plan). Returns the row count.
async fn matches_duckdb_staged_and_in_one_process(sandbox: &Sandbox, sql: &str) -> u64 {
    let reference = reference(sandbox, sql);
    sandbox.run_staged(2, Some(3)).await.expect("staged run");
    let rows = assert_matches_reference(&sandbox.read_table("tests.joins", Some(&reference)));
    sandbox
        .run(3, Some(3), None)
        .await
        .expect("single-process run");
    assert_matches_reference(&sandbox.read_table("tests.joins", Some(&reference)));
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_join_kind_with_broadcasts_matches_duckdb_across_tasks() {
    let sandbox = Sandbox::new();
    write_tables(&sandbox).await;
    sandbox.spec(&spec(EVERY_JOIN, ""));
    let plan = plan_of(&sandbox).await;
    // Both kinds of broadcast: a stage read through shuffle files, and scans read in place.
    let stage_broadcasts = plan.matches("broadcast=true").count();
    assert!(stage_broadcasts > 0, "no broadcast stage:\n{plan}");
    assert!(
        plan.matches("mode=CollectLeft").count() > stage_broadcasts,
        "no broadcast read in place:\n{plan}"
    );
    // A broadcast join that emits its build side's unmatched rows reads its probe side
    // merged into one partition (a null-aware anti join), or is not a broadcast at all.
    let lines: Vec<&str> = plan.lines().collect();
    let indent = |line: &str| line.len() - line.trim_start().len();
    for (i, line) in lines.iter().enumerate() {
        let emits_build_rows = line.contains("mode=CollectLeft")
            && [
                "join_type=Left,",
                "join_type=Full",
                "join_type=LeftSemi",
                "join_type=LeftAnti",
            ]
            .iter()
            .any(|kind| line.contains(kind));
        // Children: the build side, then the probe side, each a line indented one step
        // deeper than the join's, followed by their own children.
        let child_indent = indent(line) + 2;
        let probe = lines[i + 1..]
            .iter()
            .take_while(|l| indent(l) >= child_indent)
            .filter(|l| indent(l) == child_indent)
            .nth(1)
            .map_or("", |l| l.trim_start());
        assert!(
            !emits_build_rows || probe.starts_with("CoalescePartitionsExec"),
            "unsafe broadcast:\n{line}\n{plan}"
        );
    }
    let rows = matches_duckdb_staged_and_in_one_process(&sandbox, EVERY_JOIN).await;
    assert!(rows > 3000, "{rows}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_threshold_changes_the_plan() {
    let sandbox = Sandbox::new();
    write_tables(&sandbox).await;
    let sql = "SELECT small.s, big.v FROM big JOIN small ON small.k = big.k";
    sandbox.spec(&spec(sql, ""));
    let default = plan_of(&sandbox).await;
    assert!(default.contains("mode=CollectLeft"), "{default}");

    sandbox.spec(&spec(
        sql,
        "[execution]\nbroadcast_join_threshold_bytes = 0\n",
    ));
    let off = plan_of(&sandbox).await;
    assert!(!off.contains("broadcast=true"), "{off}");
    assert!(off.contains("mode=Partitioned"), "{off}");
    assert!(
        off.matches("stage ").count() > default.matches("stage ").count(),
        "a shuffled join needs more stages:\n{off}\nvs\n{default}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_under_a_small_memory_limit_spills_and_matches_an_unlimited_one() {
    let sandbox = Sandbox::new();
    write_tables(&sandbox).await;
    // A sort of every row of a large cross product, and a high-cardinality aggregation.
    let sql = "SELECT a.k * 3000 + b.k AS id, count(*) AS c, sum(a.v + b.v) AS total \
               FROM big a JOIN (SELECT k, v FROM big WHERE k < 1000) b ON a.k % 7 = b.k % 7 \
               GROUP BY 1 ORDER BY 1 DESC";
    let spill = under_12_mib_matches_unlimited(&sandbox, sql).await;

    // Far too little memory: the job fails, naming the operator and the limit.
    let mut embedded = EmbeddedOptions::new(sandbox.warehouse(), 2);
    embedded.memory = MemorySettings::new(Some(1 << 20), Some(spill), 2);
    let err = sandbox
        .run_embedded(embedded, Some(2), None, &[])
        .await
        .expect_err("1 MiB is not enough")
        .to_string();
    assert!(err.contains("memory limit of 1.0 MiB"), "{err}");
    assert!(err.contains("operator "), "{err}");
}

/// Runs `sql` unlimited, then under 12 MiB for two tasks, and checks both wrote the same
/// rows. Returns the spill directory.
async fn under_12_mib_matches_unlimited(sandbox: &Sandbox, sql: &str) -> std::path::PathBuf {
    sandbox.spec(&spec(sql, ""));
    let unlimited = sandbox.run(2, Some(2), None).await.expect("unlimited");
    let unlimited_read = sandbox.read_table("tests.joins", None);

    let spill = sandbox.path("spill");
    let mut embedded = EmbeddedOptions::new(sandbox.warehouse(), 2);
    embedded.memory = MemorySettings::new(Some(12 << 20), Some(spill.clone()), 2);
    let limited = sandbox
        .run_embedded(embedded, Some(2), None, &[])
        .await
        .expect("a 12 MiB run spills rather than fails");
    let limited_read = sandbox.read_table("tests.joins", None);
    assert_eq!(limited.rows, unlimited.rows);
    assert_eq!(
        limited_read["duckdb"]["checksum"],
        unlimited_read["duckdb"]["checksum"]
    );
    assert!(spill.exists(), "the spill directory was not set up");
    spill
}

/// The latest row of each of `keys` keys among `big` joined with its first 1,000 rows
/// (430,000 rows).
fn joined_dedupe(keys: u32) -> String {
    format!(
        "SELECT id, total FROM ( \
           SELECT a.k * 3000 + b.k AS id, a.v + b.v AS total, \
                  ROW_NUMBER() OVER (PARTITION BY (a.k * 3000 + b.k) % {keys} \
                                     ORDER BY a.v + b.v DESC, a.k, b.k) AS rn \
           FROM big a JOIN (SELECT k, v FROM big WHERE k < 1000) b ON a.k % 7 = b.k % 7) t \
         WHERE rn = 1"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedupe_over_more_keys_than_memory_holds_sorts_with_spill() {
    let sandbox = Sandbox::new();
    write_tables(&sandbox).await;
    // 200,000 keys: one entry per key is several times a task's 6 MiB.
    let sql = &joined_dedupe(200_000);
    sandbox.spec(&spec(sql, ""));
    let plan = plan_of(&sandbox).await;
    assert!(plan.contains("k=1 (exact)"), "{plan}");
    under_12_mib_matches_unlimited(&sandbox, sql).await;
    let rows = sandbox.read_table("tests.joins", None)["duckdb"]["rows"].clone();
    assert_eq!(rows, 200_000, "{rows}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedupe_whose_tasks_see_nearly_distinct_keys_passes_them_through_the_shuffle() {
    let sandbox = Sandbox::new();
    write_tables(&sandbox).await;
    // About 143,000 rows a task over 400,000 keys: a task's first 100,000 rows are each of
    // another key, so the top K before the shuffle passes the rest on, and the exact one
    // after it keeps the first row of each key (checked once by hand: all three tasks gave
    // up after 106,496 rows).
    let sql = &joined_dedupe(400_000);
    sandbox.spec(&spec(sql, ""));
    let plan = plan_of(&sandbox).await;
    assert!(plan.contains("k=1 (before shuffle)"), "{plan}");
    let rows = matches_duckdb_staged_and_in_one_process(&sandbox, sql).await;
    assert_eq!(rows, 400_000);
}

/// Dedupes of the nightly kind: the latest row per key (`rn = 1`), the first three per
/// non-ASCII key (`rn <= 3`, written `4 > rn`), and keys that are null.
const DEDUPES: &str = "
SELECT 'latest' AS kind, g, k, v, rn FROM (
  SELECT CAST(k % 37 AS VARCHAR) AS g, k, v,
         ROW_NUMBER() OVER (PARTITION BY k % 37 ORDER BY v DESC) AS rn FROM big) AS t
  WHERE rn = 1
UNION ALL
SELECT 'first three', g, k, v, rn FROM (
  SELECT CASE k % 3 WHEN 0 THEN 'é' WHEN 1 THEN '日本' ELSE 'ß' END || CAST(k % 5 AS VARCHAR) AS g, k, v,
         ROW_NUMBER() OVER (PARTITION BY CASE k % 3 WHEN 0 THEN 'é' WHEN 1 THEN '日本' ELSE 'ß' END, k % 5
                            ORDER BY v) AS rn FROM big) AS t
  WHERE 4 > rn
UNION ALL
SELECT 'null keys', g, k, v, rn FROM (
  SELECT CAST(k AS VARCHAR) AS g, s AS k, s AS v,
         ROW_NUMBER() OVER (PARTITION BY k ORDER BY s DESC) AS rn FROM small) AS t
  WHERE rn = 1
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_number_dedupes_keep_duckdbs_rows_across_tasks() {
    let sandbox = Sandbox::new();
    write_tables(&sandbox).await;
    sandbox.spec(&spec(DEDUPES, ""));
    let plan = plan_of(&sandbox).await;
    // A top K before the shuffle and one after it; `small` (one file) is read by one task,
    // with no shuffle. For rn = 1 no window.
    assert_eq!(plan.matches("PartitionTopKExec").count(), 5, "{plan}");
    assert_eq!(plan.matches("k=1 (exact)").count(), 2, "{plan}");
    assert_eq!(plan.matches("(before shuffle)").count(), 2, "{plan}");
    assert_eq!(plan.matches("BoundedWindowAggExec").count(), 1, "{plan}");
    let rows = matches_duckdb_staged_and_in_one_process(&sandbox, DEDUPES).await;
    // 37 latest; 3 rows of each of 3 x 5 keys; 55 keys of `small` and its null key.
    assert_eq!(rows, 37 + 45 + 56);
}
