//! Example pipelines in the embedded mode, 1 and 4 workers, checked against DataFusion on one
//! node and read back with PyIceberg and DuckDB.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use nightshift_tests::{RefSource, Sandbox, assert_matches_reference, snapshot_count};

fn lineitem_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("l_orderkey", DataType::Int64, false),
        Field::new("l_linenumber", DataType::Int32, false),
        Field::new("l_quantity", DataType::Int64, false),
        Field::new("l_extendedprice", DataType::Decimal128(15, 2), false),
        Field::new("l_discount", DataType::Decimal128(15, 2), false),
        Field::new("l_returnflag", DataType::Utf8, false),
        Field::new("l_shipdate", DataType::Date32, false),
    ]))
}

const SOURCES: &str = r#"
[[source]]
name = "orders"
format = "parquet"
location = "data/orders/"

[[source]]
name = "lineitem"
format = "csv"
location = "data/lineitem/*.csv"
[source.schema]
l_extendedprice = "decimal(15, 2) not null"
l_discount = "decimal(15, 2) not null"
l_shipdate = "date"

[[source]]
name = "customer"
format = "parquet"
location = "data/customer.parquet"
"#;

fn spec(name: &str, sql: &str, target: &str, extra: &str) -> String {
    format!(
        "[pipeline]\nname = \"{name}\"\n{SOURCES}\n[transform]\nsql = \"\"\"\n{sql}\n\"\"\"\n\n[target]\ntable = \"{target}\"\n{extra}"
    )
}

/// Runs `sql` with `workers` workers and `partitions` tasks per stage, then checks the table
/// against DataFusion with both readers. Returns the rows written.
async fn check(workers: usize, partitions: usize, name: &str, sql: &str, extra: &str) -> u64 {
    let sandbox = Sandbox::new();
    sandbox.tpch();
    let table = format!("tests.{name}");
    sandbox.spec(&spec(name, sql, &table, extra));
    let report = sandbox
        .run(workers, Some(partitions), None)
        .await
        .unwrap_or_else(|e| panic!("{name} with {workers} workers failed: {e}"));
    assert!(report.snapshot_id.is_some(), "{report:?}");
    assert!(report.tasks >= report.stages, "{report:?}");
    let reference = sandbox
        .reference(
            sql,
            &[
                RefSource::Parquet("orders", "data/orders/"),
                RefSource::Csv("lineitem", "data/lineitem/", lineitem_schema()),
                RefSource::Parquet("customer", "data/customer.parquet"),
            ],
        )
        .await;
    let read = sandbox.read_table(&table, Some(&reference));
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
    let rows = assert_matches_reference(&read);
    assert_eq!(rows, report.rows, "rows reported vs read: {report:?}");
    assert!(rows > 0);
    // Nothing but committed data and metadata is left in the warehouse.
    let scratch: Vec<_> = sandbox
        .warehouse_files()
        .into_iter()
        .filter(|f| f.starts_with(".nightshift/"))
        .collect();
    assert!(scratch.is_empty(), "scratch left behind: {scratch:?}");
    rows
}

const AGGREGATE: &str = "SELECT l_returnflag, COUNT(*) AS line_items, SUM(l_quantity) AS quantity, \
     SUM(l_extendedprice) AS gross, MIN(l_shipdate) AS first_ship \
     FROM lineitem GROUP BY l_returnflag";

const THREE_WAY_JOIN: &str = "SELECT c.c_mktsegment AS segment, o.o_orderpriority AS priority, \
     COUNT(DISTINCT o.o_orderkey) AS orders, SUM(l.l_extendedprice * (1 - l.l_discount)) AS revenue \
     FROM orders o JOIN lineitem l ON l.l_orderkey = o.o_orderkey \
     JOIN customer c ON c.c_custkey = o.o_custkey \
     GROUP BY c.c_mktsegment, o.o_orderpriority";

const DEDUPE_LATEST_ORDER: &str = "SELECT o_custkey, o_orderkey, o_orderdate, o_totalprice FROM ( \
     SELECT *, ROW_NUMBER() OVER (PARTITION BY o_custkey ORDER BY o_orderdate DESC, o_orderkey DESC) AS rn \
     FROM orders) WHERE rn = 1";

const TOP_ORDERS: &str = "SELECT o_orderkey, o_custkey, o_totalprice FROM orders \
     ORDER BY o_totalprice DESC, o_orderkey LIMIT 50";

const DAILY_BY_SEGMENT: &str = "SELECT o.o_orderdate AS order_date, c.c_mktsegment AS segment, \
     COUNT(*) AS orders, SUM(o.o_totalprice) AS total \
     FROM orders o JOIN customer c ON c.c_custkey = o.o_custkey \
     WHERE o.o_orderdate >= DATE '1995-01-01' AND o.o_orderdate < DATE '1995-03-01' \
     GROUP BY o.o_orderdate, c.c_mktsegment";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_matches_datafusion() {
    let one = check(1, 1, "agg1", AGGREGATE, "").await;
    let four = check(4, 4, "agg4", AGGREGATE, "").await;
    assert_eq!(one, four);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_way_join_matches_datafusion_broadcast_and_shuffled() {
    check(1, 1, "join1", THREE_WAY_JOIN, "").await;
    check(4, 4, "join4", THREE_WAY_JOIN, "").await;
    // No broadcast: both join sides are hash-shuffled through object storage.
    check(
        4,
        3,
        "join_shuffled",
        THREE_WAY_JOIN,
        "\n[execution]\nbroadcast_join_threshold_bytes = 0\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_dedupe_matches_datafusion() {
    let one = check(1, 1, "dedupe1", DEDUPE_LATEST_ORDER, "").await;
    let four = check(4, 4, "dedupe4", DEDUPE_LATEST_ORDER, "").await;
    assert_eq!(one, four);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_by_limit_matches_datafusion() {
    assert_eq!(check(4, 4, "top4", TOP_ORDERS, "").await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_by_day_matches_datafusion() {
    let extra = "partition_by = [\"day(order_date)\", \"identity(segment)\"]\n";
    check(1, 1, "daily1", DAILY_BY_SEGMENT, extra).await;
    check(4, 4, "daily4", DAILY_BY_SEGMENT, extra).await;
}
