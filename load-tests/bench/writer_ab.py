#!/usr/bin/env python3
"""A/B of the Parquet writer's settings: one pipeline, several `[target] properties` variants
(see VARIANTS), and DuckDB for reference, in a shuffled order per round. Prints each run and
the median time and bytes written per variant. Needs the SF1 data bench.py generates.

  python3 writer_ab.py --nightshift PATH --pipelines wide_fact --variants default,dict128k,duckdb --runs 3
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = {
    "default": None,
    "snappy": {"write.parquet.compression-codec": "snappy"},
    "lz4": {"write.parquet.compression-codec": "lz4"},
    "zstd3": {"write.parquet.compression-codec": "zstd", "write.parquet.compression-level": "3"},
    "dict16k": {"write.parquet.dict-size-bytes": "16384"},
    "dict64k": {"write.parquet.dict-size-bytes": "65536"},
    "dict128k": {"write.parquet.dict-size-bytes": "131072"},
    "dict1m": {"write.parquet.dict-size-bytes": "1048576"},
    "dict4m": {"write.parquet.dict-size-bytes": "4194304"},
}


def spec_with(base, properties):
    if not properties:
        return base
    pairs = ", ".join(f'"{k}" = "{v}"' for k, v in properties.items())
    return base.replace("[target]\n", "[target]\nproperties = { " + pairs + " }\n", 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nightshift", required=True)
    parser.add_argument("--pipelines", default="wide_fact")
    parser.add_argument("--variants", default="default,dict128k,duckdb")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", default=os.path.join(HERE, "data", "sf1"))
    args = parser.parse_args()
    pipelines = args.pipelines.split(",")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v != "duckdb" and v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}, duckdb")
    work = tempfile.mkdtemp(prefix="writer-ab-")
    specs = {}
    try:
        for p in pipelines:
            base = open(os.path.join(HERE, "pipelines", p + ".toml")).read()
            for v in variants:
                if v == "duckdb":
                    continue
                # Next to the original, so its sql_file resolves.
                path = os.path.join(HERE, "pipelines", f"_ab_{p}_{v}.toml")
                with open(path, "w") as f:
                    f.write(spec_with(base, VARIANTS[v]))
                specs[(p, v)] = path
        results = {}
        for r in range(args.runs):
            order = [(p, v) for p in pipelines for v in variants]
            random.shuffle(order)
            for p, v in order:
                started = time.monotonic()
                if v == "duckdb":
                    out = os.path.join(work, "duckdb")
                    shutil.rmtree(out, ignore_errors=True)
                    subprocess.run([sys.executable, os.path.join(HERE, "peers.py"), "duckdb", p, args.data, out],
                                   check=True, capture_output=True)
                    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
                else:
                    warehouse = os.path.join(work, "warehouse")
                    shutil.rmtree(warehouse, ignore_errors=True)
                    proc = subprocess.run(
                        [args.nightshift, "run", specs[(p, v)], "--warehouse", warehouse, "--output", "json",
                         "--param", f"data_dir={args.data}"],
                        capture_output=True, text=True)
                    if proc.returncode:
                        sys.exit(proc.stderr[-2000:])
                    size = json.loads(proc.stdout.strip().splitlines()[-1]).get("bytes", 0)
                elapsed = time.monotonic() - started
                results.setdefault((p, v), []).append((elapsed, size))
                print(f"round {r + 1} {p:16} {v:9} {elapsed:6.2f} s {size / 1e6:8.1f} MB", flush=True)
        print("\nmedians:")
        for (p, v), runs in sorted(results.items()):
            print(f"{p:16} {v:9} {statistics.median(t for t, _ in runs):6.2f} s {runs[0][1] / 1e6:8.1f} MB")
    finally:
        for path in specs.values():
            os.remove(path)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
