"""Runs one benchmark pipeline on a peer engine, in this process, and writes its result as
Parquet: `python3 peers.py ENGINE PIPELINE DATA_DIR OUT_DIR`.

ENGINE is `datafusion` (Python bindings, one process), `duckdb` or `spark` (local[2]). The SQL
is the pipeline's own file in pipelines/; every engine reads the same TPC-H Parquet files.
A partitioned pipeline (lineitem_by_day) is written as Hive partitions by day, like Nightshift's
`day(l_shipdate)` partitions.
"""

import os
import sys

TABLES = {
    "daily_revenue": ["lineitem", "orders", "customer", "nation"],
    "wide_fact": ["lineitem", "orders", "part", "supplier"],
    "latest_order": ["orders"],
    "lineitem_by_day": ["lineitem"],
    "order_totals": ["lineitem"],
}
PARTITION_BY = {"lineitem_by_day": "l_shipdate"}
HERE = os.path.dirname(os.path.abspath(__file__))


def sql_of(pipeline):
    with open(os.path.join(HERE, "pipelines", pipeline + ".sql")) as f:
        return f.read()


def run_datafusion(pipeline, data, out):
    from datafusion import SessionContext
    from datafusion.dataframe import DataFrameWriteOptions

    ctx = SessionContext()
    for t in TABLES[pipeline]:
        ctx.register_parquet(t, os.path.join(data, t) + "/")
    df = ctx.sql(sql_of(pipeline))
    part = PARTITION_BY.get(pipeline)
    options = DataFrameWriteOptions(partition_by=[part]) if part else None
    df.write_parquet(out, write_options=options)


def run_duckdb(pipeline, data, out):
    import duckdb

    con = duckdb.connect()
    for t in TABLES[pipeline]:
        con.execute(
            f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{os.path.join(data, t)}/*.parquet')"
        )
    part = PARTITION_BY.get(pipeline)
    if part:
        con.execute(
            f"COPY ({sql_of(pipeline)}) TO '{out}' (FORMAT parquet, PARTITION_BY ({part}))"
        )
    else:
        os.makedirs(out, exist_ok=True)
        con.execute(f"COPY ({sql_of(pipeline)}) TO '{out}/result.parquet' (FORMAT parquet)")


def run_spark(pipeline, data, out):
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("nightshift-bench")
        .config("spark.driver.memory", "4g")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "8")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    for t in TABLES[pipeline]:
        spark.read.parquet(os.path.join(data, t)).createOrReplaceTempView(t)
    df = spark.sql(sql_of(pipeline))
    part = PARTITION_BY.get(pipeline)
    writer = df.write.mode("overwrite")
    if part:
        writer = writer.partitionBy(part)
    writer.parquet(out)
    spark.stop()


if __name__ == "__main__":
    engine, pipeline, data, out = sys.argv[1:5]
    {"datafusion": run_datafusion, "duckdb": run_duckdb, "spark": run_spark}[engine](
        pipeline, data, out
    )
