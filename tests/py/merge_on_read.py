"""Writes a merge-on-read Iceberg table with DuckDB through a REST catalog: rows inserted in
two snapshots, then deleted and updated (DuckDB writes position delete files for both, as
Spark and Flink do for merge-on-read tables), then a last insert that no delete applies to.

Prints one JSON object: the table's data and delete files as PyIceberg plans them.

With --run SQL it writes no table: it runs SQL (`{table}` standing for the table) on the
catalog, e.g. a DELETE that leaves position delete files in a table Nightshift wrote.

Usage: merge_on_read.py REST_URI S3_ENDPOINT WAREHOUSE NAMESPACE.TABLE [--run SQL]
       (credentials from AWS_* env; the catalog's OAuth2 client is the same key pair)
"""

import json
import os
import sys

import duckdb
import duckdb_extensions


def connect(rest_uri, s3_endpoint, warehouse):
    for ext in ("avro", "httpfs", "iceberg"):
        duckdb_extensions.import_extension(ext)
    con = duckdb.connect()
    con.execute("LOAD httpfs")
    con.execute("LOAD iceberg")
    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    con.execute(
        "CREATE SECRET (TYPE S3, KEY_ID ?, SECRET ?, ENDPOINT ?, URL_STYLE 'path', USE_SSL false, REGION 'us-east-1')",
        [key, secret, s3_endpoint.split("://", 1)[-1]],
    )
    con.execute(
        "CREATE SECRET upstream (TYPE ICEBERG, CLIENT_ID ?, CLIENT_SECRET ?, OAUTH2_SERVER_URI ?)",
        [key, secret, f"{rest_uri}/v1/oauth/tokens"],
    )
    con.execute(
        f"ATTACH '{warehouse}' AS upstream (TYPE ICEBERG, ENDPOINT '{rest_uri}', SECRET upstream, READ_ONLY false)"
    )
    return con


def write(con, table):
    namespace = table.split(".")[0]
    name = f"upstream.{table}"
    con.execute(f"CREATE SCHEMA IF NOT EXISTS upstream.{namespace}")
    con.execute(f"CREATE TABLE {name} (id BIGINT, region VARCHAR, amount DOUBLE, note VARCHAR)")
    rows = "SELECT i, CASE WHEN i % 3 = 0 THEN 'north' ELSE 'south' END, i * 1.5, 'order ' || i FROM range({}, {}) t(i)"
    con.execute(f"INSERT INTO {name} " + rows.format(1, 2001))
    con.execute(f"INSERT INTO {name} " + rows.format(2001, 3001))
    con.execute(f"DELETE FROM {name} WHERE id % 7 = 0")
    con.execute(f"UPDATE {name} SET amount = -1, note = 'réglé ✓' WHERE id IN (5, 2005)")
    con.execute(
        f"INSERT INTO {name} SELECT i, 'east', i * 0.5, 'später ' || i FROM range(3001, 3501) t(i)"
    )


def planned_files(rest_uri, s3_endpoint, warehouse, table):
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog(
        "upstream",
        type="rest",
        uri=rest_uri,
        warehouse=warehouse,
        credential=f"{os.environ['AWS_ACCESS_KEY_ID']}:{os.environ['AWS_SECRET_ACCESS_KEY']}",
        **{
            "s3.endpoint": s3_endpoint,
            "s3.access-key-id": os.environ["AWS_ACCESS_KEY_ID"],
            "s3.secret-access-key": os.environ["AWS_SECRET_ACCESS_KEY"],
            "s3.region": "us-east-1",
            "s3.path-style-access": "true",
        },
    )
    files = []
    for task in catalog.load_table(table).scan().plan_files():
        files.append({
            "data": task.file.file_path,
            "deletes": [[str(d.content), d.file_path] for d in task.delete_files],
        })
    return files


def main():
    rest_uri, s3_endpoint, warehouse, table = sys.argv[1:5]
    con = connect(rest_uri, s3_endpoint, warehouse)
    if sys.argv[5:6] == ["--run"]:
        con.execute(sys.argv[6].replace("{table}", f"upstream.{table}"))
    else:
        write(con, table)
    print(json.dumps({"files": planned_files(rest_uri, s3_endpoint, warehouse, table)}))


if __name__ == "__main__":
    main()
