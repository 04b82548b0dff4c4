//! `[target] schema_evolution = "add_columns"`: a run adds nullable columns and widens types
//! as Iceberg allows, in the same commit as its rows; anything else is refused with both
//! schemas side by side, and the table stays as it was. Read back by PyIceberg and DuckDB.

use nightshift_tests::{Sandbox, snapshot_count, unreferenced};
use serde_json::Value;

const TABLE: &str = "tests.evolving";

/// A spec reading `data/day.csv` with the column types `schema` declares, selecting
/// `columns`, into the target table with `mode` and `evolution`.
fn spec(schema: &[(&str, &str)], columns: &str, mode: &str, evolution: &str) -> String {
    let schema: String = schema
        .iter()
        .map(|(name, ty)| format!("{name} = \"{ty}\"\n"))
        .collect();
    format!(
        r#"[pipeline]
name = "evolving"

[[source]]
name = "day"
format = "csv"
location = "data/day.csv"
[source.schema]
{schema}
[transform]
sql = "SELECT {columns} FROM day"

[target]
table = "{TABLE}"
mode = "{mode}"
schema_evolution = "{evolution}"
"#
    )
}

/// The table's schemas as PyIceberg reads them: (current schema id, per schema id its
/// columns as `name:type`), and each snapshot's schema id, oldest first.
fn schemas(sandbox: &Sandbox) -> Value {
    let script = format!(
        "import json, sys\n\
         from pyiceberg.catalog.sql import SqlCatalog\n\
         w = '{w}'\n\
         t = SqlCatalog('nightshift', uri=f'sqlite:///{{w}}/catalog.db', warehouse=w).load_table('{TABLE}')\n\
         m = t.metadata\n\
         snaps = sorted(m.snapshots, key=lambda s: s.sequence_number)\n\
         json.dump({{'current': m.current_schema_id,\n\
           'schemas': {{str(s.schema_id): [f'{{f.name}}:{{f.field_type}}' for f in s.fields] for s in m.schemas}},\n\
           'snapshot_schemas': [s.schema_id for s in snaps]}}, sys.stdout)\n",
        w = sandbox.warehouse().display()
    );
    nightshift_tests::python_json(&script, &[])
}

/// `nightshift validate` of the sandbox's spec passes and shows each of `lines` (the schema
/// changes a run would make).
fn assert_validate_shows(sandbox: &Sandbox, lines: &[&str]) {
    let validate = sandbox.cli(&["validate", "pipeline.toml", "--warehouse", "warehouse"]);
    let shown = String::from_utf8_lossy(&validate.stdout);
    assert!(
        validate.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&validate.stderr)
    );
    for line in lines {
        assert!(shown.contains(line), "validate shows `{line}`:\n{shown}");
    }
}

/// The rows each reader sees, sorted, as `[columns, rows]`; PyIceberg and DuckDB must agree.
fn rows(sandbox: &Sandbox) -> (Value, Value) {
    let read = sandbox.read_table_with(TABLE, None, &["--every-snapshot", "--references"]);
    assert_eq!(
        read["pyiceberg"]["checksum"], read["duckdb"]["checksum"],
        "{read:#}"
    );
    assert_eq!(
        read["pyiceberg"]["columns"], read["duckdb"]["columns"],
        "{read:#}"
    );
    assert_eq!(
        unreferenced(&sandbox.data_files(), &read),
        Vec::<&String>::new()
    );
    (read["pyiceberg"].clone(), read)
}

#[tokio::test(flavor = "multi_thread")]
async fn add_columns_adds_and_widens_in_the_runs_own_commit() {
    let sandbox = Sandbox::new();
    sandbox.write("data/day.csv", "id,amount\n1,10.50\n2,20.25\n");
    sandbox.spec(&spec(
        &[("id", "int"), ("amount", "decimal(10, 2)")],
        "id, amount",
        "append",
        "none",
    ));
    sandbox.run(2, None, None).await.expect("first run");

    // The next day's feed has a wider id, a wider amount and a new column.
    sandbox.write(
        "data/day.csv",
        "id,amount,note\n3000000000,1234567890.12,späte Lieferung\n4,1.00,\n",
    );
    let evolving = spec(
        &[
            ("id", "bigint"),
            ("amount", "decimal(12, 2)"),
            ("note", "string"),
        ],
        "id, amount, note",
        "append",
        "add_columns",
    );
    sandbox.spec(&evolving);
    assert_validate_shows(
        &sandbox,
        &[
            "widened id: int -> long",
            "widened amount: decimal(10, 2) -> decimal(12, 2)",
            "added note: string",
        ],
    );
    let report = sandbox.run(2, None, None).await.expect("evolving run");
    assert_eq!(report.rows, 2);

    let s = schemas(&sandbox);
    assert_eq!(
        s["schemas"]["0"],
        serde_json::json!(["id:int", "amount:decimal(10, 2)"]),
        "{s:#}"
    );
    let current = s["current"].to_string();
    assert_eq!(
        s["schemas"][&current],
        serde_json::json!(["id:long", "amount:decimal(12, 2)", "note:string"]),
        "{s:#}"
    );
    // One snapshot per run: the schema change came with the rows, and the first snapshot
    // keeps the schema it was written with.
    assert_eq!(
        s["snapshot_schemas"],
        serde_json::json!([0, s["current"]]),
        "{s:#}"
    );

    let (now, read) = rows(&sandbox);
    assert_eq!(snapshot_count(&read), 2);
    assert_eq!(now["columns"], serde_json::json!(["id", "amount", "note"]));
    assert_eq!(now["rows"], 4);
    let first = nightshift_tests::first_rows(&now);
    assert!(
        first.iter().any(|r| r == r#"[1, "10.50", null]"#),
        "{first:?}"
    );
    // The first snapshot, read as it was: the old columns and the first run's rows.
    let old = &read["by_snapshot"][0];
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(old[reader]["rows"], 2, "{reader}: {old:#}");
        assert_eq!(
            old[reader]["columns"],
            serde_json::json!(["id", "amount"]),
            "{reader}: {old:#}"
        );
    }
    let all = &read["by_snapshot"][1]["duckdb"];
    assert_eq!(all["rows"], 4, "{all:#}");

    // An overwrite may evolve too: another column, the table's whole content replaced.
    sandbox.write("data/day.csv", "id,amount,note,qty\n5,2.00,x,7\n");
    sandbox.spec(&spec(
        &[
            ("id", "bigint"),
            ("amount", "decimal(12, 2)"),
            ("note", "string"),
            ("qty", "int"),
        ],
        "id, amount, note, qty",
        "overwrite",
        "add_columns",
    ));
    sandbox
        .run(1, None, None)
        .await
        .expect("overwrite that evolves");
    let (now, read) = rows(&sandbox);
    assert_eq!(snapshot_count(&read), 3);
    assert_eq!(now["rows"], 1);
    assert_eq!(now["first"][0], r#"[5, "2.00", "x", 7]"#);
    let s = schemas(&sandbox);
    assert_eq!(s["schemas"].as_object().unwrap().len(), 3, "{s:#}");

    // A narrower result still fits as it is (int into the long id): no new schema.
    sandbox.write("data/day.csv", "id,amount,note,qty\n6,3.00,y,8\n");
    sandbox.spec(&spec(
        &[
            ("id", "int"),
            ("amount", "decimal(12, 2)"),
            ("note", "string"),
            ("qty", "int"),
        ],
        "id, amount, note, qty",
        "append",
        "none",
    ));
    sandbox.run(1, None, None).await.expect("narrower result");
    assert_eq!(schemas(&sandbox)["schemas"].as_object().unwrap().len(), 3);
    assert_eq!(rows(&sandbox).0["rows"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_the_policy_does_not_allow_are_refused_side_by_side_and_nothing_changes() {
    let sandbox = Sandbox::new();
    sandbox.write("data/day.csv", "id,amount\n1,10.50\n");
    sandbox.spec(&spec(
        &[("id", "bigint"), ("amount", "double")],
        "id, amount",
        "append",
        "none",
    ));
    sandbox.run(1, None, None).await.expect("first run");
    let before = sandbox.warehouse_files();

    // A new column without add_columns.
    sandbox.write("data/day.csv", "id,amount,note\n2,1.5,n\n");
    sandbox.spec(&spec(
        &[("id", "bigint"), ("amount", "double"), ("note", "string")],
        "id, amount, note",
        "append",
        "none",
    ));
    let err = sandbox.run(1, None, None).await.unwrap_err().to_string();
    assert!(err.contains("REFUSED: a new column"), "{err}");
    assert!(
        err.contains("schema_evolution = \\\"add_columns\\\"")
            || err.contains("schema_evolution = \"add_columns\""),
        "{err}"
    );

    // A type Iceberg cannot change, even with add_columns; the error shows both schemas.
    sandbox.write("data/day.csv", "id,amount\n2,lots\n");
    sandbox.spec(&spec(
        &[("id", "bigint"), ("amount", "string")],
        "id, amount",
        "append",
        "add_columns",
    ));
    let err = sandbox.run(1, None, None).await.unwrap_err().to_string();
    assert!(err.contains("column  table   result"), "{err}");
    assert!(
        err.contains("amount  double  string  REFUSED: Iceberg cannot change double to string"),
        "{err}"
    );
    let validate = sandbox.cli(&["validate", "pipeline.toml", "--warehouse", "warehouse"]);
    assert!(!validate.status.success());
    assert!(
        String::from_utf8_lossy(&validate.stderr)
            .contains("Iceberg cannot change double to string"),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );

    // Nothing was committed, and no file was left behind.
    assert_eq!(sandbox.warehouse_files(), before);
    let s = schemas(&sandbox);
    assert_eq!(s["schemas"].as_object().unwrap().len(), 1, "{s:#}");
    let (now, _) = rows(&sandbox);
    assert_eq!(now["rows"], 1);
}

/// A first run killed after creating the table (here: aborted just before its commit) leaves
/// it with no snapshot and the schema of that run's code. The fixed spec's run, whose result
/// retypes one column, renames another and drops a third, replaces that schema in its own
/// commit, under `schema_evolution = "none"`; it was refused, the empty table's schema
/// being one only another engine could change.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_a_killed_first_run_left_empty_takes_the_fixed_specs_schema() {
    let sandbox = Sandbox::new();
    sandbox.write("data/day.csv", "id,amount,note\n1,10.50,x\n2,20.25,ÿ\n");
    sandbox.spec(&spec(
        &[("id", "int"), ("amount", "string"), ("note", "string")],
        "id, amount, note",
        "append",
        "none",
    ));
    let killed = std::process::Command::new(nightshift_tests::nightshift_bin())
        .args([
            "run",
            "pipeline.toml",
            "--job-id",
            "first-1",
            "--warehouse",
            "warehouse",
        ])
        .current_dir(sandbox.path(""))
        .env("FAILPOINTS", "coordinator-between-commits=return")
        .output()
        .expect("run nightshift");
    assert!(!killed.status.success());
    let s = schemas(&sandbox);
    assert_eq!(
        s["schemas"]["0"],
        serde_json::json!(["id:int", "amount:string", "note:string"]),
        "{s:#}"
    );
    assert_eq!(s["snapshot_schemas"], serde_json::json!([]), "{s:#}");

    sandbox.spec(&spec(
        &[
            ("id", "bigint"),
            ("amount", "decimal(10, 2)"),
            ("note", "string"),
        ],
        "id, amount AS amount_eur",
        "append",
        "none",
    ));
    assert_validate_shows(
        &sandbox,
        &[
            "the table has no snapshot yet: its schema is replaced",
            "widened id: int -> long",
            "added amount_eur: decimal(10, 2)",
            "dropped amount: string",
            "dropped note: string",
        ],
    );
    let report = sandbox.run(2, None, None).await.expect("the fixed run");
    assert_eq!(report.rows, 2);
    let s = schemas(&sandbox);
    let current = s["current"].to_string();
    assert_eq!(
        s["schemas"][&current],
        serde_json::json!(["id:long", "amount_eur:decimal(10, 2)"]),
        "{s:#}"
    );
    assert_eq!(
        s["snapshot_schemas"],
        serde_json::json!([s["current"]]),
        "{s:#}"
    );
    // The killed run's files stay unreferenced (for a rerun of its job id or orphan
    // removal), so the readers are compared here without `rows`'s check of them.
    let read = sandbox.read_table(TABLE, None);
    assert_eq!(snapshot_count(&read), 1);
    assert_eq!(read["pyiceberg"]["rows"], 2, "{read:#}");
    assert_eq!(
        read["pyiceberg"]["checksum"], read["duckdb"]["checksum"],
        "{read:#}"
    );

    // Now that the table holds rows, the same kind of change is refused again.
    sandbox.spec(&spec(
        &[("id", "bigint"), ("amount", "string"), ("note", "string")],
        "id, note",
        "append",
        "none",
    ));
    let err = sandbox.run(1, None, None).await.unwrap_err().to_string();
    assert!(
        err.contains("REFUSED: the result lacks this column"),
        "{err}"
    );
}

/// Builds `raw.people` with PyIceberg in the sandbox's warehouse: two rows, then a column
/// added and `id` widened from int to long, then a third row; with `rename`, `name` is then
/// renamed `full_name` and a fourth row appended.
fn evolved_upstream(sandbox: &Sandbox, rename: bool) {
    let script = format!(
        "import json, os, sys, pyarrow as pa\n\
         from pyiceberg.catalog.sql import SqlCatalog\n\
         from pyiceberg.types import LongType, StringType\n\
         w = '{w}'\n\
         os.makedirs(w, exist_ok=True)\n\
         c = SqlCatalog('nightshift', uri=f'sqlite:///{{w}}/catalog.db', warehouse=w)\n\
         c.create_namespace('raw')\n\
         t = c.create_table('raw.people', schema=pa.schema([('id', pa.int32()), ('name', pa.string())]))\n\
         t.append(pa.table({{'id': pa.array([1, 2], pa.int32()), 'name': ['ana', 'bo']}}))\n\
         with t.update_schema() as u:\n\
         \x20   u.add_column('city', StringType())\n\
         \x20   u.update_column('id', LongType())\n\
         t = c.load_table('raw.people')\n\
         t.append(pa.table({{'id': pa.array([3000000000], pa.int64()), 'name': ['cé'], 'city': ['Lyon']}}))\n\
         if {rename}:\n\
         \x20   with t.update_schema() as u:\n\
         \x20       u.rename_column('name', 'full_name')\n\
         \x20   t = c.load_table('raw.people')\n\
         \x20   t.append(pa.table({{'id': pa.array([4], pa.int64()), 'full_name': ['dee'], 'city': ['Oslo']}}))\n\
         json.dump(len(t.scan().to_arrow()), sys.stdout)\n",
        w = sandbox.warehouse().display(),
        rename = if rename { "True" } else { "False" },
    );
    let rows: u64 = nightshift_tests::python_json(&script, &[]);
    assert_eq!(rows, if rename { 4 } else { 3 });
}

fn people_spec(columns: &str) -> String {
    format!(
        r#"[pipeline]
name = "people"

[[source]]
name = "people"
format = "iceberg"
table = "raw.people"

[transform]
sql = "SELECT {columns} FROM people"

[target]
table = "tests.people"
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_with_added_widened_and_renamed_columns_reads_right() {
    let sandbox = Sandbox::new();
    evolved_upstream(&sandbox, false);
    sandbox.spec(&people_spec("id, name, city"));
    sandbox.run(1, None, None).await.expect("evolved source");
    let read = sandbox.read_table("tests.people", None);
    assert_eq!(read["pyiceberg"]["checksum"], read["duckdb"]["checksum"]);
    let rows = nightshift_tests::first_rows(&read["pyiceberg"]);
    assert_eq!(
        rows,
        [
            r#"[1, "ana", null]"#,
            r#"[2, "bo", null]"#,
            r#"[3000000000, "cé", "Lyon"]"#
        ]
    );

    // A rename: files written before hold `name`; read by field id, they give `full_name`.
    for staged in [false, true] {
        let sandbox = Sandbox::new();
        evolved_upstream(&sandbox, true);
        sandbox.spec(&people_spec("id, full_name, city"));
        if staged {
            sandbox.run_staged(2, Some(2)).await
        } else {
            sandbox.run(1, None, None).await
        }
        .expect("renamed source");
        let read = sandbox.read_table("tests.people", None);
        assert_eq!(read["pyiceberg"]["checksum"], read["duckdb"]["checksum"]);
        assert_eq!(read["pyiceberg"]["rows"], 4);
        let rows = nightshift_tests::first_rows(&read["pyiceberg"]);
        assert_eq!(
            rows,
            [
                r#"[1, "ana", null]"#,
                r#"[2, "bo", null]"#,
                r#"[3000000000, "cé", "Lyon"]"#
            ],
            "staged: {staged}"
        );
        let all = nightshift_tests::python_json::<Vec<(i64, String)>>(
            &format!(
                "import json, sys\n\
                 from pyiceberg.catalog.sql import SqlCatalog\n\
                 w = '{w}'\n\
                 t = SqlCatalog('nightshift', uri=f'sqlite:///{{w}}/catalog.db', warehouse=w).load_table('tests.people')\n\
                 json.dump(sorted((r['id'], r['full_name']) for r in t.scan().to_arrow().to_pylist()), sys.stdout)\n",
                w = sandbox.warehouse().display()
            ),
            &[],
        );
        assert_eq!(
            all,
            [
                (1, "ana".to_string()),
                (2, "bo".to_string()),
                (4, "dee".to_string()),
                (3000000000, "cé".to_string())
            ]
        );
    }
}

#[test]
fn on_a_cluster_the_workers_write_with_the_evolved_schema() {
    use nightshift_tests::cluster::{ClusterSandbox, ClusterStorage};
    let cluster = ClusterSandbox::start(ClusterStorage::LocalWithPostgres, 2, &[]);
    let data = cluster.sandbox.path("data/day.csv").display().to_string();
    let on_cluster = |spec: String| spec.replace("\"data/day.csv\"", &format!("\"{data}\""));
    cluster
        .sandbox
        .write("data/day.csv", "id,amount\n1,10.50\n2,20.25\n");
    cluster.sandbox.spec(&on_cluster(spec(
        &[("id", "int"), ("amount", "decimal(10, 2)")],
        "id, amount",
        "append",
        "none",
    )));
    let first = cluster.submit("evolve-1", &[]);
    assert_eq!(
        first["status"],
        "succeeded",
        "{first:#}\n{}",
        cluster.logs()
    );
    cluster
        .sandbox
        .write("data/day.csv", "id,amount,note\n3000000000,1.00,nöte\n");
    cluster.sandbox.spec(&on_cluster(spec(
        &[
            ("id", "bigint"),
            ("amount", "decimal(12, 2)"),
            ("note", "string"),
        ],
        "id, amount, note",
        "append",
        "add_columns",
    )));
    let second = cluster.submit("evolve-2", &[]);
    assert_eq!(
        second["status"],
        "succeeded",
        "{second:#}\n{}",
        cluster.logs()
    );
    let read = cluster.read_table(TABLE, None);
    assert_eq!(
        read["pyiceberg"]["checksum"], read["duckdb"]["checksum"],
        "{read:#}"
    );
    assert_eq!(
        read["pyiceberg"]["columns"],
        serde_json::json!(["id", "amount", "note"])
    );
    assert_eq!(read["pyiceberg"]["rows"], 3);
    assert_eq!(read["snapshots"].as_array().unwrap().len(), 2);
    let first = nightshift_tests::first_rows(&read["pyiceberg"]);
    assert!(
        first.iter().any(|r| r == r#"[3000000000, "1.00", "nöte"]"#),
        "{first:?}"
    );
}

/// Builds `raw.events` with PyIceberg: two rows unpartitioned, then partitioned by
/// `identity(region)`, two more, then by `identity(at)` too (PyIceberg writes the time
/// transforms only with its optional native module), two more: three partition specs in one
/// table. Returns what PyIceberg reads, sorted.
fn partition_evolved_upstream(sandbox: &Sandbox) -> Vec<(i64, String, String)> {
    let script = format!(
        "import datetime as dt, json, os, sys, pyarrow as pa\n\
         from pyiceberg.catalog.sql import SqlCatalog\n\
         from pyiceberg.transforms import IdentityTransform\n\
         w = '{w}'\n\
         os.makedirs(w, exist_ok=True)\n\
         c = SqlCatalog('nightshift', uri=f'sqlite:///{{w}}/catalog.db', warehouse=w)\n\
         c.create_namespace('raw')\n\
         schema = pa.schema([('id', pa.int64()), ('region', pa.string()), ('at', pa.timestamp('us'))])\n\
         t = c.create_table('raw.events', schema=schema)\n\
         def rows(ids, region, day):\n\
         \x20   return pa.table({{'id': ids, 'region': [region] * len(ids), 'at': [dt.datetime(2024, 1, day, 12)] * len(ids)}}, schema=schema)\n\
         t.append(rows([1, 2], 'eu', 1))\n\
         with t.update_spec() as u:\n\
         \x20   u.add_field('region', IdentityTransform(), 'region')\n\
         t = c.load_table('raw.events')\n\
         t.append(rows([3], 'eu', 2))\n\
         t.append(rows([4], 'üs', 2))\n\
         with t.update_spec() as u:\n\
         \x20   u.add_field('at', IdentityTransform(), 'at_value')\n\
         t = c.load_table('raw.events')\n\
         t.append(rows([5], 'eu', 3))\n\
         t.append(rows([6], 'üs', 4))\n\
         assert len(t.specs()) == 3, t.specs()\n\
         out = sorted((r['id'], r['region'], r['at'].isoformat()) for r in t.scan().to_arrow().to_pylist())\n\
         json.dump(out, sys.stdout)\n",
        w = sandbox.warehouse().display(),
    );
    nightshift_tests::python_json(&script, &[])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_whose_partition_spec_evolved_reads_every_row() {
    for staged in [false, true] {
        let sandbox = Sandbox::new();
        let upstream = partition_evolved_upstream(&sandbox);
        assert_eq!(upstream.len(), 6);
        sandbox.spec(
            r#"[pipeline]
name = "events"

[[source]]
name = "events"
format = "iceberg"
table = "raw.events"

[transform]
sql = "SELECT id, region, CAST(\"at\" AS VARCHAR) AS at FROM events WHERE region <> 'none'"

[target]
table = "tests.events"
"#,
        );
        if staged {
            sandbox.run_staged(2, Some(2)).await
        } else {
            sandbox.run(1, None, None).await
        }
        .expect("partition-evolved source");
        let all = nightshift_tests::python_json::<Vec<(i64, String, String)>>(
            &format!(
                "import json, sys\n\
                 from pyiceberg.catalog.sql import SqlCatalog\n\
                 w = '{w}'\n\
                 t = SqlCatalog('nightshift', uri=f'sqlite:///{{w}}/catalog.db', warehouse=w).load_table('tests.events')\n\
                 json.dump(sorted((r['id'], r['region'], r['at']) for r in t.scan().to_arrow().to_pylist()), sys.stdout)\n",
                w = sandbox.warehouse().display()
            ),
            &[],
        );
        assert_eq!(all, upstream, "staged: {staged}");
        let read = sandbox.read_table("tests.events", None);
        assert_eq!(read["pyiceberg"]["checksum"], read["duckdb"]["checksum"]);
    }
}

/// A merge adds a column and widens one as an append does: the table's rows the changes do
/// not touch get null in the new column, changed and new rows their value (it failed: "No
/// field named __nightshift_t.note"), and an `int` column becomes `long` (it stayed `int`,
/// and a value past it failed the task).
#[tokio::test(flavor = "multi_thread")]
async fn a_merge_adds_a_column_in_its_own_commit() {
    let sandbox = Sandbox::new();
    let merge = |columns: &str, schema: &[(&str, &str)]| {
        spec(schema, columns, "merge", "add_columns").replace(
            "mode = \"merge\"",
            "mode = \"merge\"\nmerge_keys = [\"id\"]",
        )
    };
    sandbox.write("data/day.csv", "id,name,qty\n1,Ann,5\n2,Bob,6\n");
    sandbox.spec(&merge("id, name, qty", &[("id", "bigint"), ("qty", "int")]));
    sandbox.run(2, None, None).await.expect("first merge");
    sandbox.write(
        "data/day.csv",
        "id,name,note,qty\n2,Bob,späte Lieferung,3000000000\n3,Cy,neu,7\n",
    );
    sandbox.spec(&merge(
        "id, name, note, qty",
        &[("id", "bigint"), ("note", "string"), ("qty", "bigint")],
    ));
    sandbox
        .run(2, None, None)
        .await
        .expect("merge adding a column");
    let read: Value = sandbox.with_pyiceberg_table(
        TABLE,
        "json.dump(sorted(t.scan().to_arrow().to_pylist(), key=lambda r: r['id']), sys.stdout)",
    );
    assert_eq!(
        read,
        serde_json::json!([
            {"id": 1, "name": "Ann", "qty": 5, "note": null},
            {"id": 2, "name": "Bob", "qty": 3_000_000_000i64, "note": "späte Lieferung"},
            {"id": 3, "name": "Cy", "qty": 7, "note": "neu"},
        ]),
        "{read:#}"
    );
    let (_, both) = rows(&sandbox);
    assert_eq!(snapshot_count(&both), 2);
    let schemas = schemas(&sandbox);
    let current = schemas["current"].to_string();
    assert!(
        schemas["schemas"][&current]
            .as_array()
            .is_some_and(|columns| columns.iter().any(|c| c == "qty:long")),
        "{schemas:#}"
    );
}
