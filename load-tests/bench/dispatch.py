#!/usr/bin/env python3
"""Dispatch benchmark: how many near-empty tasks per second go coordinator -> RabbitMQ ->
workers -> results, and how much coordinator CPU each costs.

Starts a coordinator and 2 workers like bench.py (private vhost, Redis prefix, catalog), runs
a pipeline over a 10-row Parquet file with `shuffle_partitions = N` (every stage has N
tasks, almost all of them with nothing to read or write) for a small and a large N, and
reports the difference: tasks/s = extra tasks / extra seconds, coordinator CPU per task =
extra coordinator CPU time / extra tasks. Nothing is asserted.

    python3 load-tests/bench/dispatch.py --nightshift target/release/nightshift --tasks 2000 [--prefetch 4]
"""

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Cluster  # noqa: E402

SPEC = """[pipeline]
name = "dispatch_{n}"

[[source]]
name = "tiny"
format = "parquet"
location = "{data}"

[transform]
sql = "SELECT k, count(*) AS c FROM tiny GROUP BY k"

[target]
table = "bench.dispatch_{n}"
mode = "overwrite"

[execution]
shuffle_partitions = {n}
"""


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(cluster, workdir, data, n):
    spec = os.path.join(workdir, f"dispatch_{n}.toml")
    with open(spec, "w") as f:
        f.write(SPEC.format(n=n, data=data))
    coordinator = cluster.procs[0].pid
    workers = [p.pid for p in cluster.procs[1:]]
    cpu_before = cpu_seconds(coordinator)
    workers_before = sum(cpu_seconds(p) for p in workers)
    elapsed, _, stdout = cluster.run(spec, {})
    report = json.loads(stdout.strip().splitlines()[-1])
    if "tasks" not in report:
        raise RuntimeError(f"the job did not succeed: {report}")
    return {
        "partitions": n,
        "tasks": report["tasks"],
        "seconds": elapsed,
        "coordinator_cpu_s": cpu_seconds(coordinator) - cpu_before,
        "workers_cpu_s": sum(cpu_seconds(p) for p in workers) - workers_before,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nightshift", default=os.environ.get("NIGHTSHIFT_BIN", "nightshift"))
    parser.add_argument("--tasks", type=int, default=2000, help="partitions of the large run")
    parser.add_argument("--keys", type=int, default=3, help="distinct grouping keys in the input")
    parser.add_argument(
        "--prefetch", type=int, default=1, help="tasks each worker runs at once (NIGHTSHIFT_RABBITMQ_PREFETCH)"
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    import duckdb

    workdir = os.path.join(args.out, "dispatch")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    data = os.path.join(workdir, "tiny.parquet")
    # --keys 3: almost every task has nothing to read; --keys >= --tasks: every task reads a
    # segment of the one map task, and each stage plan names one segment per task.
    duckdb.connect().execute(
        f"COPY (SELECT range % {args.keys} AS k FROM range({max(10, args.keys)})) TO '{data}' (FORMAT parquet)"
    )
    os.environ["NIGHTSHIFT_RABBITMQ_PREFETCH"] = str(args.prefetch)
    cluster = Cluster(args.nightshift, workdir, 2, None)
    try:
        run(cluster, workdir, data, 2)  # warm-up: table creation, connections
        small = run(cluster, workdir, data, 2)
        large = run(cluster, workdir, data, args.tasks)
    finally:
        cluster.stop()
    extra_tasks = large["tasks"] - small["tasks"]
    extra_seconds = large["seconds"] - small["seconds"]
    result = {
        "small": small,
        "large": large,
        "tasks_per_second": extra_tasks / extra_seconds,
        "coordinator_cpu_ms_per_task": 1000 * (large["coordinator_cpu_s"] - small["coordinator_cpu_s"]) / extra_tasks,
        "workers_cpu_ms_per_task": 1000 * (large["workers_cpu_s"] - small["workers_cpu_s"]) / extra_tasks,
    }
    with open(os.path.join(args.out, "dispatch.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"{large['tasks']} tasks in {large['seconds']:.1f} s ({small['tasks']} in {small['seconds']:.1f} s): "
        f"{result['tasks_per_second']:.0f} tasks/s, coordinator {result['coordinator_cpu_ms_per_task']:.2f} ms CPU/task, "
        f"workers {result['workers_cpu_ms_per_task']:.2f} ms CPU/task"
    )


if __name__ == "__main__":
    main()
