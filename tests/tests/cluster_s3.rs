//! Cluster mode on S3 (a private SeaweedFS) with its Iceberg REST catalog, and with the SQL
//! catalog on PostgreSQL: the same content as DataFusion on one node, read back by PyIceberg
//! and DuckDB over S3, scratch deleted; then an overwrite of the same table through each
//! catalog, and an expiry of its first snapshot. The table is partitioned by a value that
//! needs escaping in its directory name.

use nightshift_tests::cluster::{
    ClusterSandbox, ClusterStorage, Seaweed, orders_and_customers_spec, uuid_like,
};
use nightshift_tests::{RefSource, assert_matches_reference, snapshot_count};

const SQL: &str = "SELECT o.o_orderpriority AS priority, c.c_mktsegment AS segment, COUNT(*) AS orders, \
     SUM(o.o_totalprice) AS total, MIN(o.o_orderdate) AS first_order \
     FROM orders o JOIN customer c ON c.c_custkey = o.o_custkey GROUP BY 1, 2";

/// The same query limited to one priority, for the overwrite.
const SQL_URGENT_ONLY: &str = "SELECT o.o_orderpriority AS priority, c.c_mktsegment AS segment, COUNT(*) AS orders, \
     SUM(o.o_totalprice) AS total, MIN(o.o_orderdate) AS first_order \
     FROM orders o JOIN customer c ON c.c_custkey = o.o_custkey WHERE o.o_orderpriority = '1-URGENT' GROUP BY 1, 2";

/// Submits the sandbox's spec as `job_id`, expects success, and reads the table back with
/// `sql` run by DataFusion on the sources as the reference.
async fn submit_and_read(cluster: &ClusterSandbox, job_id: &str, sql: &str) -> serde_json::Value {
    let outcome = cluster.submit(job_id, &[]);
    assert_eq!(
        outcome["status"],
        "succeeded",
        "{outcome}\n{}",
        cluster.logs()
    );
    let sources = [
        RefSource::Parquet("orders", "data/orders/"),
        RefSource::Parquet("customer", "data/customer.parquet"),
    ];
    let reference = cluster.sandbox.reference(sql, &sources).await;
    cluster.read_table("tests.priorities", Some(&reference))
}

async fn run_on(storage: ClusterStorage, seaweed: &Seaweed) -> ClusterSandbox {
    let cluster = ClusterSandbox::start(storage, 3, &[]);
    cluster.sandbox.tpch();
    let data = cluster.sandbox.path("data");
    cluster.sandbox.spec(&orders_and_customers_spec(
        &data,
        "s3_test",
        SQL,
        "tests.priorities",
        // `4-NOT SPECIFIED` needs escaping in its directory name (`priority=4-NOT+SPECIFIED`),
        // which both readers must follow from the manifests on S3.
        "identity(priority)",
        3,
    ));
    let read = submit_and_read(&cluster, "s3-job", SQL).await;
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
    assert_matches_reference(&read);
    assert!(
        seaweed.list("_scratch/").is_empty(),
        "scratch left: {:?}",
        seaweed.list("_scratch/")
    );
    let again = cluster.submit("s3-job", &[]);
    assert_eq!(again["already_committed"], true, "{again}");

    // The same table overwritten with a smaller result: our own snapshot and catalog swap
    // (a REST commit or the SQL compare-and-swap) on S3.
    let spec = std::fs::read_to_string(cluster.sandbox.path("pipeline.toml")).unwrap();
    cluster.sandbox.spec(
        &spec
            .replace(SQL, SQL_URGENT_ONLY)
            .replace("[target]\n", "[target]\nmode = \"overwrite\"\n"),
    );
    let read = submit_and_read(&cluster, "s3-overwrite", SQL_URGENT_ONLY).await;
    assert_eq!(snapshot_count(&read), 2, "{read:#}");
    assert_eq!(read["snapshots"][1]["operation"], "overwrite", "{read:#}");
    assert!(assert_matches_reference(&read) > 0);
    let again = cluster.submit("s3-overwrite", &[]);
    assert_eq!(again["already_committed"], true, "{again}");

    cluster
}

/// Expiry through the catalog on S3 (the first job's snapshot goes): the first job's rerun
/// still commits nothing.
fn expire_and_rerun(cluster: &ClusterSandbox) {
    let config = cluster.config.to_string_lossy().to_string();
    let expired = cluster.cli(&[
        "maintain",
        "tests.priorities",
        "--cluster",
        &config,
        "--expire-older-than",
        "0s",
        "--keep-last",
        "1",
    ]);
    assert!(
        expired.status.success(),
        "{}",
        String::from_utf8_lossy(&expired.stderr)
    );
    let again = cluster.submit("s3-job", &[]);
    assert_eq!(again["already_committed"], true, "{again}");
    let read = cluster.read_table("tests.priorities", None);
    assert_eq!(snapshot_count(&read), 1, "{read:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_with_rest_catalog() {
    let seaweed = Seaweed::start();
    let cluster = run_on(seaweed.with_rest_catalog(), &seaweed).await;
    // An S3 table bucket refuses other objects in a table's metadata: the list of expired
    // jobs is not written there, and the expiry goes on without it.
    expire_and_rerun(&cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_with_postgres_sql_catalog() {
    let seaweed = Seaweed::start();
    let name = format!("s3pg{}", &uuid_like()[..8]);
    let cluster = run_on(seaweed.with_postgres_catalog(&name), &seaweed).await;
    let data = seaweed.list("warehouse/tests/priorities/data/");
    assert!(
        data.iter()
            .any(|key| key.contains("/priority=4-NOT+SPECIFIED/")),
        "{data:?}"
    );
    expire_and_rerun(&cluster);
    let metadata = seaweed.list("warehouse/tests/priorities/metadata/");
    assert!(
        metadata
            .iter()
            .any(|key| key.contains("/nightshift-expired-jobs-")),
        "{metadata:?}"
    );
}
