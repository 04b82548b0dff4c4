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
    let validate = sandbox.cli(&["validate", "pipeline.toml", "--warehouse", "warehouse"]);
    let shown = String::from_utf8_lossy(&validate.stdout);
    assert!(
        validate.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&validate.stderr)
    );
    for line in [
        "widened id: int -> long",
        "widened amount: decimal(10, 2) -> decimal(12, 2)",
        "added note: string",
    ] {
        assert!(shown.contains(line), "validate shows `{line}`:\n{shown}");
    }
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
    let first: Vec<&str> = now["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(first.contains(&r#"[1, "10.50", null]"#), "{first:?}");
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
