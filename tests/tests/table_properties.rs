//! The Parquet writer follows the table's Iceberg `write.parquet.*` properties, and a value
//! it cannot use fails the job before any task runs, naming the property.

use nightshift_tests::Sandbox;

fn spec(properties: &str) -> String {
    format!(
        r#"[pipeline]
name = "props"

[[source]]
name = "day"
format = "csv"
location = "data/day.csv"
[source.schema]
id = "bigint"
customer = "string"

[transform]
sql = "SELECT id, customer FROM day"

[target]
table = "tests.props"
properties = {{ {properties} }}
"#
    )
}

/// `column:CODEC` of every column chunk of every data file, read by pyarrow.
fn codecs(sandbox: &Sandbox) -> Vec<String> {
    let files: Vec<String> = sandbox
        .data_files()
        .iter()
        .map(|f| sandbox.warehouse().join(f).display().to_string())
        .collect();
    assert!(!files.is_empty());
    let script = "import json, sys, pyarrow.parquet as pq\n\
         out = []\n\
         for path in sys.argv[1:]:\n\
         \x20   meta = pq.ParquetFile(path).metadata\n\
         \x20   for g in range(meta.num_row_groups):\n\
         \x20       for c in range(meta.num_columns):\n\
         \x20           col = meta.row_group(g).column(c)\n\
         \x20           out.append(f'{col.path_in_schema}:{col.compression}')\n\
         json.dump(sorted(set(out)), sys.stdout)\n";
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    nightshift_tests::python_json(script, &files)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_writer_uses_the_tables_codec_and_refuses_one_it_cannot() {
    let sandbox = Sandbox::new();
    sandbox.write("data/day.csv", "id,customer\n1,ana\n2,bo\n3,ana\n");

    // No property: Iceberg's default codec.
    sandbox.spec(&spec(""));
    sandbox.run(1, None, None).await.expect("default codec");
    assert_eq!(codecs(&sandbox), ["customer:ZSTD", "id:ZSTD"]);

    let sandbox = Sandbox::new();
    sandbox.write("data/day.csv", "id,customer\n1,ana\n2,bo\n3,ana\n");
    sandbox.spec(&spec(
        r#""write.parquet.compression-codec" = "snappy", "write.parquet.bloom-filter-enabled.column.customer" = "true""#,
    ));
    sandbox.run(2, None, None).await.expect("snappy");
    assert_eq!(codecs(&sandbox), ["customer:SNAPPY", "id:SNAPPY"]);
    let read = sandbox.read_table("tests.props", None);
    assert_eq!(read["duckdb"]["rows"], 3, "{read:#}");
    assert_eq!(read["pyiceberg"]["checksum"], read["duckdb"]["checksum"]);

    let sandbox = Sandbox::new();
    sandbox.write("data/day.csv", "id,customer\n1,ana\n");
    sandbox.spec(&spec(r#""write.parquet.compression-codec" = "zip""#));
    let err = sandbox.run(1, None, None).await.unwrap_err().to_string();
    assert!(
        err.contains("table property `write.parquet.compression-codec` = `zip`"),
        "{err}"
    );
    assert!(
        sandbox.data_files().is_empty(),
        "{:?}",
        sandbox.data_files()
    );
}
