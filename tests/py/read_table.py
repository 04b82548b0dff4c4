"""Reads an Iceberg table written by Nightshift with PyIceberg and with DuckDB.

Prints one JSON object: for each reader the row count and a checksum of the rows, each row
canonicalised the same way (so equal checksums mean equal content), and the snapshots, oldest
first, with their operations and summaries. With --reference FILE.parquet it also checksums that file (the rows
DataFusion computed directly on the sources), so the caller compares all three.

With --every-snapshot it also reads each snapshot (time travel) with both readers; with
--references it lists the name of every file any snapshot references (manifest lists,
manifests, data and delete files), read by PyIceberg, and as live_references the data and
delete files some snapshot reads (entries not DELETED); --rollback-to ID first rolls the table
back to that snapshot, --set-current ID makes any snapshot current (PyIceberg's
manage_snapshots).

Usage: read_table.py --warehouse DIR --table ns.name [--reference ref.parquet]
       read_table.py --catalog-uri postgresql+psycopg2://... --catalog-name N --table ns.name
       read_table.py --rest-uri http://... --s3-endpoint http://... --table ns.name
"""

import argparse
import datetime
import decimal
import hashlib
import json
import os
import sys


def canonical(value):
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
            return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return value.strftime("%Y-%m-%dT%H:%M:%S.%f")
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def summarize(columns, rows):
    lines = sorted(
        json.dumps([canonical(v) for v in row], ensure_ascii=False) for row in rows
    )
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"columns": list(columns), "rows": len(lines), "checksum": digest, "first": lines[:3]}


def open_catalog(args):
    from pyiceberg.catalog import load_catalog

    props = {}
    if args.s3_endpoint:
        props.update({
            "s3.endpoint": args.s3_endpoint,
            "s3.access-key-id": os.environ.get("AWS_ACCESS_KEY_ID", ""),
            "s3.secret-access-key": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            "s3.region": "us-east-1",
            "s3.path-style-access": "true",
        })
    if args.rest_uri:
        credential = os.environ.get("NIGHTSHIFT_CATALOG_CREDENTIAL")
        if credential:
            props["credential"] = credential
        return load_catalog(args.catalog_name, type="rest", uri=args.rest_uri, warehouse=args.catalog_warehouse, **props)
    uri = args.catalog_uri or f"sqlite:///{os.path.join(os.path.abspath(args.warehouse), 'catalog.db')}"
    warehouse = args.catalog_warehouse or os.path.abspath(args.warehouse)
    return load_catalog(args.catalog_name, type="sql", uri=uri, warehouse=warehouse, **props)


def read_pyiceberg(table):
    arrow = table.scan().to_arrow()
    columns = arrow.column_names
    rows = [tuple(r[c] for c in columns) for r in arrow.to_pylist()]
    snapshots = [
        {"snapshot_id": s.snapshot_id, "summary": dict(s.summary.additional_properties) if s.summary else {},
         "operation": s.summary.operation.value if s.summary else None}
        # Oldest first: metadata files list snapshots in no particular order.
        for s in sorted(table.metadata.snapshots, key=lambda s: (s.sequence_number or 0, s.timestamp_ms))
    ]
    return summarize(columns, rows), snapshots


def duckdb_connection(args):
    import duckdb
    import duckdb_extensions

    for ext in ("avro", "httpfs", "iceberg"):
        duckdb_extensions.import_extension(ext)
    con = duckdb.connect()
    con.execute("LOAD iceberg")
    if args.s3_endpoint:
        endpoint = args.s3_endpoint.split("://", 1)[-1]
        con.execute(
            "CREATE SECRET (TYPE S3, KEY_ID ?, SECRET ?, ENDPOINT ?, URL_STYLE 'path', USE_SSL false, REGION 'us-east-1')",
            [os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", ""), endpoint],
        )
    return con


def read_every_snapshot(table, args):
    """Each snapshot as PyIceberg and DuckDB read it, oldest first."""
    con = duckdb_connection(args)
    out = []
    for s in sorted(table.metadata.snapshots, key=lambda s: (s.sequence_number or 0, s.timestamp_ms)):
        arrow = table.scan(snapshot_id=s.snapshot_id).to_arrow()
        columns = arrow.column_names
        py = summarize(columns, [tuple(r[c] for c in columns) for r in arrow.to_pylist()])
        cursor = con.execute(
            "SELECT * FROM iceberg_scan(?, snapshot_from_id => ?)",
            [table.metadata_location, s.snapshot_id],
        )
        dd = summarize([d[0] for d in cursor.description], cursor.fetchall())
        out.append({"snapshot_id": s.snapshot_id, "pyiceberg": py, "duckdb": dd})
    return out


def referenced_files(table, discard_deleted=False):
    """Names of every file any snapshot references: manifest lists, manifests, and the data
    and delete files of their entries (with discard_deleted, of the entries not DELETED)."""

    io = table.io
    names = set()
    for s in table.metadata.snapshots:
        names.add(s.manifest_list.rsplit("/", 1)[-1])
        for manifest in s.manifests(io):
            names.add(manifest.manifest_path.rsplit("/", 1)[-1])
            for entry in manifest.fetch_manifest_entry(io, discard_deleted=discard_deleted):
                names.add(entry.data_file.file_path.rsplit("/", 1)[-1])
    return sorted(names)


def read_duckdb(table, args):
    con = duckdb_connection(args)
    cursor = con.execute("SELECT * FROM iceberg_scan(?)", [table.metadata_location])
    columns = [d[0] for d in cursor.description]
    return summarize(columns, cursor.fetchall())


def read_reference(path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = table.column_names
    rows = [tuple(r[c] for c in columns) for r in table.to_pylist()]
    return summarize(columns, rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--warehouse", default=".")
    parser.add_argument("--table", required=True)
    parser.add_argument("--reference")
    parser.add_argument("--catalog-name", default="nightshift")
    parser.add_argument("--catalog-uri", help="SQLAlchemy URI of a SQL catalog (default: <warehouse>/catalog.db)")
    parser.add_argument("--catalog-warehouse")
    parser.add_argument("--rest-uri")
    parser.add_argument("--s3-endpoint")
    parser.add_argument("--every-snapshot", action="store_true")
    parser.add_argument("--references", action="store_true")
    parser.add_argument("--rollback-to", type=int)
    parser.add_argument("--set-current", type=int)
    parser.add_argument(
        "--expire-all-but-current",
        action="store_true",
        help="expire every other snapshot with PyIceberg first (another engine's expiry)",
    )
    args = parser.parse_args()
    catalog = open_catalog(args)
    out = {"exists": catalog.table_exists(args.table)}
    if out["exists"]:
        table = catalog.load_table(args.table)
        if args.rollback_to is not None:
            table.manage_snapshots().rollback_to_snapshot(args.rollback_to).commit()
            table = catalog.load_table(args.table)
        if args.set_current is not None:
            table.manage_snapshots().set_current_snapshot(args.set_current).commit()
            table = catalog.load_table(args.table)
        if args.expire_all_but_current:
            current = table.metadata.current_snapshot_id
            others = [s.snapshot_id for s in table.metadata.snapshots if s.snapshot_id != current]
            table.maintenance.expire_snapshots().by_ids(others).commit()
            table = catalog.load_table(args.table)
        out["pyiceberg"], out["snapshots"] = read_pyiceberg(table)
        out["duckdb"] = read_duckdb(table, args) if out["snapshots"] else None
        if args.every_snapshot:
            out["by_snapshot"] = read_every_snapshot(table, args)
        if args.references:
            out["references"] = referenced_files(table)
            out["live_references"] = referenced_files(table, discard_deleted=True)
    if args.reference:
        out["reference"] = read_reference(args.reference)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
