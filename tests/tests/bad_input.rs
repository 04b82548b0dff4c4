//! Each kind of bad input fails with a message naming the file, column or line, and leaves
//! the table as it was: no new snapshot and no new file in the warehouse.

use nightshift_tests::{Sandbox, snapshot_count};

const GOOD_CSV: &str = "id,city,amount\n1,Zürich,10.50\n2,東京,20.25\n3,Lyon,1.00\n";

fn spec(location: &str, format: &str, extra_source: &str, sql: &str, target_extra: &str) -> String {
    format!(
        r#"[pipeline]
name = "bad_input"

[[source]]
name = "src"
format = "{format}"
location = "{location}"
{extra_source}

[transform]
sql = "{sql}"

[target]
table = "tests.t"
{target_extra}"#
    )
}

fn good_spec() -> String {
    spec(
        "data/good.csv",
        "csv",
        "[source.schema]\nid = \"bigint not null\"\namount = \"decimal(10, 2)\"",
        "SELECT * FROM src",
        "",
    )
}

/// A sandbox whose table holds one committed snapshot from a good run.
async fn with_committed_table() -> (Sandbox, Vec<String>) {
    let sandbox = Sandbox::new();
    sandbox.write("data/good.csv", GOOD_CSV);
    sandbox.spec(&good_spec());
    let report = sandbox.run(2, Some(2), None).await.expect("good run");
    assert_eq!(report.rows, 3);
    let files = sandbox.warehouse_files();
    (sandbox, files)
}

/// Runs the current spec, expects failure with every `needles` in the message, and checks
/// that the warehouse is exactly as before.
async fn assert_fails_cleanly(sandbox: &Sandbox, before: &[String], needles: &[&str]) -> String {
    let err = sandbox
        .run(2, Some(2), None)
        .await
        .expect_err("bad input must fail")
        .to_string();
    for needle in needles {
        assert!(
            err.contains(needle),
            "error `{err}` should mention `{needle}`"
        );
    }
    assert_eq!(
        sandbox.warehouse_files(),
        before,
        "the warehouse changed after: {err}"
    );
    let read = sandbox.read_table("tests.t", None);
    assert_eq!(snapshot_count(&read), 1, "snapshot added after: {err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_file() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.spec(&spec(
        "data/nope/*.parquet",
        "parquet",
        "",
        "SELECT * FROM src",
        "",
    ));
    assert_fails_cleanly(
        &sandbox,
        &before,
        &["source `src`", "no files found", "data/nope/*.parquet"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_parquet_names_the_file() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.write(
        "data/pq/broken.parquet",
        "this is not parquet, only some text",
    );
    sandbox.spec(&spec("data/pq/", "parquet", "", "SELECT * FROM src", ""));
    assert_fails_cleanly(
        &sandbox,
        &before,
        &["source `src`", "broken.parquet", "not a valid Parquet file"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_wrong_column_count_names_file_and_line() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.write(
        "data/good.csv",
        "id,city,amount\n1,Zürich,10.50\n2,Lyon,3.00,surplus\n",
    );
    assert_fails_cleanly(
        &sandbox,
        &before,
        &["good.csv", "line 3", "Expected 3 records, found 4"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_unparsable_value_names_file_column_and_record() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.write(
        "data/good.csv",
        "id,city,amount\n1,Zürich,10.50\nseven,Lyon,3.00\n",
    );
    assert_fails_cleanly(
        &sandbox,
        &before,
        &[
            "'seven'",
            "column `id`",
            "record 2 (header not counted)",
            "good.csv",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_column_in_sql() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.spec(&spec(
        "data/good.csv",
        "csv",
        "",
        "SELECT id, citty FROM src",
        "",
    ));
    assert_fails_cleanly(&sandbox, &before, &["transform SQL", "citty"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_syntax_error_and_ddl_are_rejected() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.spec(&spec("data/good.csv", "csv", "", "SELEC id FROM src", ""));
    assert_fails_cleanly(&sandbox, &before, &["transform SQL", "SELEC"]).await;
    sandbox.spec(&spec("data/good.csv", "csv", "", "DROP TABLE src", ""));
    assert_fails_cleanly(&sandbox, &before, &["transform SQL", "not supported"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_type_mismatch_and_missing_column() {
    let (sandbox, before) = with_committed_table().await;
    nightshift::example_data::write_parquet(
        &sandbox.path("data/typed.parquet"),
        &arrow::array::RecordBatch::try_from_iter(vec![(
            "id",
            std::sync::Arc::new(arrow::array::StringArray::from(vec!["a"]))
                as arrow::array::ArrayRef,
        )])
        .unwrap(),
    )
    .unwrap();
    sandbox.spec(&spec(
        "data/typed.parquet",
        "parquet",
        "[source.schema]\nid = \"bigint\"",
        "SELECT * FROM src",
        "",
    ));
    assert_fails_cleanly(
        &sandbox,
        &before,
        &[
            "source `src`",
            "typed.parquet",
            "column `id`",
            "`bigint`",
            "Utf8",
        ],
    )
    .await;
    sandbox.spec(&spec(
        "data/typed.parquet",
        "parquet",
        "[source.schema]\nuser_id = \"bigint\"",
        "SELECT * FROM src",
        "",
    ));
    assert_fails_cleanly(
        &sandbox,
        &before,
        &[
            "column `user_id`",
            "missing from the data",
            "its columns are: id",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_not_null_violation() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.write(
        "data/good.csv",
        "id,city,amount\n1,Zürich,10.50\n,Lyon,3.00\n",
    );
    assert_fails_cleanly(
        &sandbox,
        &before,
        &[
            "source `src`",
            "column `id`",
            "bigint not null",
            "holds nulls",
            "good.csv",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_spec_key_suggests_the_right_one() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.spec(&good_spec().replace("format = \"csv\"", "format = \"csv\"\nlocaton = \"x\""));
    assert_fails_cleanly(
        &sandbox,
        &before,
        &[
            "pipeline.toml",
            "line ",
            "unknown field `locaton`",
            "did you mean `location`?",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_partition_transform() {
    // On a fresh warehouse: nothing may be created.
    let sandbox = Sandbox::new();
    sandbox.write("data/good.csv", GOOD_CSV);
    sandbox.spec(&spec(
        "data/good.csv",
        "csv",
        "",
        "SELECT * FROM src",
        "partition_by = [\"weekday(city)\"]",
    ));
    let err = sandbox
        .run(1, None, None)
        .await
        .expect_err("unknown transform")
        .to_string();
    assert!(err.contains("unknown transform `weekday`"), "{err}");
    sandbox.spec(&spec(
        "data/good.csv",
        "csv",
        "",
        "SELECT * FROM src",
        "partition_by = [\"day(city)\"]",
    ));
    let err = sandbox
        .run(1, None, None)
        .await
        .expect_err("day of a string")
        .to_string();
    assert!(
        err.contains("tests.t") && err.contains("partition_by does not fit"),
        "{err}"
    );
    sandbox.spec(&spec(
        "data/good.csv",
        "csv",
        "",
        "SELECT * FROM src",
        "partition_by = [\"day(created)\"]",
    ));
    let err = sandbox
        .run(1, None, None)
        .await
        .expect_err("unknown column")
        .to_string();
    assert!(
        err.contains("column `created`") && err.contains("result columns: id, city, amount"),
        "{err}"
    );
    assert!(
        !sandbox.read_table("tests.t", None)["exists"]
            .as_bool()
            .unwrap()
    );
    assert!(sandbox.data_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_warehouse() {
    let sandbox = Sandbox::new();
    sandbox.write("data/good.csv", GOOD_CSV);
    sandbox.write(
        "warehouse",
        "a file where the warehouse directory should be",
    );
    sandbox.spec(&good_spec());
    let err = sandbox
        .run(1, None, None)
        .await
        .expect_err("warehouse is a file")
        .to_string();
    assert!(
        err.contains("cannot create warehouse") && err.contains("warehouse"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_input_commits_nothing_and_succeeds() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.write("data/good.csv", "id,city,amount\n");
    let report = sandbox
        .run(2, Some(2), None)
        .await
        .expect("empty input is not an error");
    assert_eq!(report.rows, 0);
    assert_eq!(report.snapshot_id, None, "{report:?}");
    assert_eq!(sandbox.warehouse_files(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_names_the_file_and_line() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.write(
        "data/json_bad/a.json",
        "{\"id\": 1, \"city\": \"Zürich\", \"amount\": 10.5}\n",
    );
    sandbox.write(
        "data/json_bad/b.json",
        "{\"id\": 2, \"city\": \"Lyon\", \"amount\": 3.0}\n{\"id\": 3, \"city\": \n{\"id\": 4}\n",
    );
    sandbox.spec(&spec("data/json_bad/", "json", "", "SELECT * FROM src", ""));
    assert_fails_cleanly(
        &sandbox,
        &before,
        &["b.json line 2 column 18", "not valid JSON"],
    )
    .await;
    // Valid JSON whose files disagree on a column's type: both files are named.
    sandbox.write(
        "data/json_bad/b.json",
        "{\"id\": \"two\", \"city\": \"Lyon\", \"amount\": 3.0}\n",
    );
    assert_fails_cleanly(&sandbox, &before, &["column `id`", "a.json", "b.json"]).await;
}

/// A directory's hidden files (an upload in progress, a writer's marker, named `.*` or `_*`)
/// are not read, as Spark and Hive skip them: here one holds a torn row that would fail the
/// run. Files in `key=value` directories are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_files_in_a_directory_source_are_not_read() {
    let sandbox = Sandbox::new();
    sandbox.write("data/in/good.csv", GOOD_CSV);
    sandbox.write("data/in/day=2/late.csv", "id,city,amount\n4,Oslo,4.00\n");
    sandbox.write("data/in/.good.csv.partial.csv", "id,city,amount\n5,Tor");
    sandbox.write("data/in/_temporary.csv", "id,city,amount\n6,Lima,6.00\n");
    sandbox.spec(&spec(
        "data/in/",
        "csv",
        "[source.schema]\nid = \"bigint not null\"\namount = \"decimal(10, 2)\"",
        "SELECT * FROM src",
        "",
    ));
    let report = sandbox.run(2, Some(2), None).await.expect("run");
    assert_eq!(report.rows, 4, "{report:?}");
    let read = sandbox.read_table("tests.t", None);
    assert_eq!(read["pyiceberg"]["rows"], 4, "{read:#}");
}

/// A function that makes a value as large as an argument says (`repeat`, `lpad`, `range`)
/// fails past 64 MiB in one value, naming itself, before the value is made: DataFusion
/// folds such constant calls while planning, outside any memory pool (3 GB on the
/// coordinator from one request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_too_large_to_make_fails_by_function_name() {
    let (sandbox, before) = with_committed_table().await;
    for sql in [
        "SELECT id, repeat(city, 800000000) AS city, amount FROM src",
        "SELECT id, city, amount FROM src WHERE length(lpad(city, 900000000)) > 0",
    ] {
        sandbox.spec(&spec(
            "data/good.csv",
            "csv",
            "[source.schema]\nid = \"bigint not null\"\namount = \"decimal(10, 2)\"",
            sql,
            "",
        ));
        assert_fails_cleanly(
            &sandbox,
            &before,
            &["would make a value of", "at most 67108864"],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_header_naming_a_column_twice_or_not_at_all_names_the_file_and_columns() {
    let (sandbox, before) = with_committed_table().await;
    // The reader failed with "incorrect number of fields for line 1", naming no file.
    sandbox.write("data/good.csv", "id,city,id\n1,Zürich,10.50\n");
    assert_fails_cleanly(
        &sandbox,
        &before,
        &["good.csv", "columns 1 and 3 are both named `id`"],
    )
    .await;
    // A delimiter at the end of the header published a column named "".
    sandbox.spec(&spec("data/good.csv", "csv", "", "SELECT * FROM src", ""));
    sandbox.write("data/good.csv", "id,city,amount,\r\n1,Zürich,10.50,\r\n");
    assert_fails_cleanly(&sandbox, &before, &["good.csv", "column 4 has no name"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_extension_differs_only_in_case_is_not_left_out_silently() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.write("data/months/jan.csv", GOOD_CSV);
    sandbox.write("data/months/FEB.CSV", GOOD_CSV);
    sandbox.write("data/months/notes.txt", "not data\n");
    sandbox.spec(&spec(
        "data/months/",
        "csv",
        "[source.schema]\nid = \"bigint not null\"\namount = \"decimal(10, 2)\"",
        "SELECT * FROM src",
        "",
    ));
    assert_fails_cleanly(
        &sandbox,
        &before,
        &["holds FEB.CSV ending in `.csv` but for case", "rename it"],
    )
    .await;
    // Renamed, both months are read.
    std::fs::rename(
        sandbox.path("data/months/FEB.CSV"),
        sandbox.path("data/months/feb.csv"),
    )
    .unwrap();
    let report = sandbox.run(2, Some(2), None).await.expect("both months");
    assert_eq!(report.rows, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_case_column_named_unquoted_is_pointed_at_quoted() {
    let (sandbox, before) = with_committed_table().await;
    sandbox.write("data/good.csv", "OrderID,a.b,Amount\n1,x,10.50\n");
    sandbox.spec(&spec(
        "data/good.csv",
        "csv",
        "",
        "SELECT OrderID, Amount FROM src",
        "",
    ));
    assert_fails_cleanly(
        &sandbox,
        &before,
        &[
            "transform SQL",
            "write \"OrderID\" (a column of `src`) in double quotes",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_number_in_a_column_inferred_as_text_is_named_by_line() {
    let sandbox = Sandbox::new();
    let mut records: String = (1..=5)
        .map(|i| format!("{{\"id\": \"X-{i}\", \"v\": {i}}}\n"))
        .collect();
    records.push_str("{\"id\": 6, \"v\": 6}\n");
    sandbox.write("data/mixed.json", &records);
    sandbox.spec(
        &spec("data/mixed.json", "json", "", "SELECT * FROM src", "")
            .replace("tests.t", "tests.json_mixed"),
    );
    let err = sandbox
        .run(2, Some(2), None)
        .await
        .expect_err("a number in a text column")
        .to_string();
    assert!(
        err.contains("mixed.json line 6: `id` holds 6 where the column is text"),
        "{err}"
    );
    assert!(
        sandbox
            .warehouse_files()
            .iter()
            .all(|f| !f.ends_with(".parquet"))
    );
}
