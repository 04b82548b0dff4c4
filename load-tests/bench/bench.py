#!/usr/bin/env python3
"""Nightshift against DataFusion, DuckDB and Spark on TPC-H: one command, see README.md.

Generates TPC-H Parquet with tpchgen-cli, runs every pipeline of pipelines/ on every engine,
in rounds (each round runs every engine once per pipeline, in a shuffled order, so slow
drifts of a shared machine hit all engines alike), checks that all engines produce the same
rows (row count and a checksum per column), and writes results.md (median wall time, ratio to
Nightshift embedded, peak RSS), results.json and results.svg into --out.

Engines: `embedded` (nightshift run), `cluster` (a coordinator and 2 workers on this machine's
RabbitMQ, Redis and PostgreSQL, started by this script in a vhost, key prefix and catalog of
its own), `datafusion` (Python bindings, one process), `duckdb`, `spark` (local[2]). Each
engine runs as its own process under /usr/bin/time -v; the cluster's peak RSS is the peak of
the sum of its three processes, sampled every 50 ms.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINES = ["daily_revenue", "wide_fact", "latest_order", "lineitem_by_day", "order_totals"]
ENGINES = ["embedded", "cluster", "datafusion", "duckdb", "spark"]
PEERS = {"datafusion", "duckdb", "spark"}


def log(message):
    print(message, file=sys.stderr, flush=True)


def generate(scale, parts, data_root):
    data = os.path.join(data_root, f"sf{scale:g}")
    if os.path.exists(os.path.join(data, "supplier")):
        return data
    log(f"generating TPC-H SF{scale:g} into {data} ...")
    subprocess.run(
        ["tpchgen-cli", "parquet", "-s", f"{scale:g}", f"--parts={parts}", "--output-dir", data],
        check=True,
    )
    return data


def time_v(command, env=None):
    """Runs `command` under /usr/bin/time -v: (seconds, peak RSS in bytes, stdout)."""
    started = time.monotonic()
    proc = subprocess.run(
        ["/usr/bin/time", "-v"] + command, capture_output=True, text=True, env=env
    )
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return elapsed, int(rss.group(1)) * 1024 if rss else 0, proc.stdout


class Cluster:
    """A coordinator and workers of our own on the machine's RabbitMQ, Redis and PostgreSQL."""

    def __init__(self, nightshift, workdir, workers, memory_limit):
        self.nightshift = nightshift
        self.prefix = "nsbench" + uuid.uuid4().hex[:8]
        self.dir = os.path.join(workdir, "cluster")
        os.makedirs(self.dir, exist_ok=True)
        subprocess.run(["rabbitmqctl", "add_vhost", self.prefix], check=True, capture_output=True)
        subprocess.run(
            ["rabbitmqctl", "set_permissions", "-p", self.prefix, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )
        worker_section = f'[worker]\nmemory_limit = "{memory_limit}"\n' if memory_limit else ""
        self.config = os.path.join(self.dir, "cluster.toml")
        with open(self.config, "w") as f:
            f.write(
                f"""[rabbitmq]
url = "amqp://guest:guest@127.0.0.1:5672/{self.prefix}"
prefix = "{self.prefix}"
[redis]
url = "redis://127.0.0.1:6379"
prefix = "{self.prefix}"
[storage]
scratch = "{self.dir}/scratch"
[catalog]
type = "sql"
uri = "postgres://root@127.0.0.1:5432/test"
warehouse = "{self.dir}/warehouse"
name = "{self.prefix}"
{worker_section}"""
            )
        self.logs = []
        self.procs = [self._start(["coordinator", "--config", self.config], "coordinator")]
        for i in range(workers):
            self.procs.append(
                self._start(["worker", "--config", self.config, "--id", f"w{i}"], f"worker-{i}")
            )
        time.sleep(2)

    def _start(self, args, name):
        out = open(os.path.join(self.dir, name + ".log"), "w")
        self.logs.append(out)
        return subprocess.Popen([self.nightshift] + args, stdout=out, stderr=out)

    def rss(self):
        total = 0
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def run(self, spec, params):
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], self.rss())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            command = [self.nightshift, "run", spec, "--cluster", self.config, "--output", "json"]
            for k, v in params.items():
                command += ["--param", f"{k}={v}"]
            started = time.monotonic()
            proc = subprocess.run(command, capture_output=True, text=True)
            elapsed = time.monotonic() - started
        finally:
            done.set()
            sampler.join()
        if proc.returncode != 0:
            raise RuntimeError(f"cluster run failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        return elapsed, peak[0], proc.stdout

    def catalog(self):
        return {
            "uri": "postgresql+psycopg2://root@127.0.0.1:5432/test",
            "name": self.prefix,
            "warehouse": os.path.join(self.dir, "warehouse"),
        }

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in self.logs:
            f.close()
        subprocess.run(["rabbitmqctl", "delete_vhost", self.prefix], capture_output=True)


def read_nightshift(catalog, pipeline):
    """The committed rows of bench.<pipeline> as an Arrow table (PyIceberg)."""
    from pyiceberg.catalog import load_catalog

    cat = load_catalog(catalog["name"], type="sql", uri=catalog["uri"], warehouse=catalog["warehouse"])
    return cat.load_table(f"bench.{pipeline}").scan().to_arrow()


def checksum(source):
    """Row count and, per column, an order-independent checksum computed by DuckDB: exact
    decimal sums for numbers, sums of hashes of the text form for the rest."""
    import duckdb

    con = duckdb.connect()
    if isinstance(source, str):
        con.execute(
            f"CREATE VIEW r AS SELECT * FROM read_parquet('{source}/**/*.parquet', hive_partitioning = true)"
        )
    else:
        con.register("r", source)
    columns = con.execute("DESCRIBE r").fetchall()
    parts = ["count(*)"]
    names = []
    for name, kind, *_ in sorted(columns):
        names.append(name)
        if re.match(r"(DECIMAL|BIGINT|INTEGER|HUGEINT|SMALLINT|DOUBLE|FLOAT)", kind):
            parts.append(f'sum(CAST("{name}" AS DECIMAL(38, 4)))')
        else:
            parts.append(f'sum(hash(CAST("{name}" AS VARCHAR)) % 1000000007)')
    row = con.execute(f"SELECT {', '.join(parts)} FROM r").fetchone()
    return {"rows": row[0], "columns": dict(zip(names, [str(v) for v in row[1:]]))}


def files_per_partition(report):
    if report.get("partitions", 0) > 1:
        return f"{report['files']} files / {report['partitions']} partitions (max {report['max_files_per_partition']})"
    return f"{report.get('files', '?')} files"


def run_once(engine, pipeline, args, data, workdir, cluster):
    spec = os.path.join(HERE, "pipelines", pipeline + ".toml")
    out = os.path.join(workdir, "out", engine, pipeline)
    # Peers write into `out` itself: its parent must exist whichever engine runs first.
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if engine == "embedded":
        warehouse = os.path.join(workdir, "warehouse")
        shutil.rmtree(warehouse, ignore_errors=True)
        command = [args.nightshift, "run", spec, "--warehouse", warehouse, "--output", "json",
                   "--param", f"data_dir={data}"]
        if args.memory_limit:
            command += ["--memory-limit", args.memory_limit]
        elapsed, rss, stdout = time_v(command)
        report = json.loads(stdout.strip().splitlines()[-1])
        source = {"uri": f"sqlite:///{warehouse}/catalog.db", "name": "nightshift", "warehouse": warehouse}
        return elapsed, rss, report, lambda: read_nightshift(source, pipeline)
    if engine == "cluster":
        elapsed, rss, stdout = cluster.run(spec, {"data_dir": data})
        report = json.loads(stdout.strip().splitlines()[-1])
        return elapsed, rss, report, lambda: read_nightshift(cluster.catalog(), pipeline)
    shutil.rmtree(out, ignore_errors=True)
    elapsed, rss, _ = time_v([sys.executable, os.path.join(HERE, "peers.py"), engine, pipeline, data, out])
    return elapsed, rss, {}, lambda: out


def svg_chart(results, pipelines, engines, path):
    """Grouped bars: time relative to Nightshift embedded, per pipeline (log-free, capped)."""
    colors = {"embedded": "#1f6feb", "cluster": "#8250df", "datafusion": "#2da44e",
              "duckdb": "#bf8700", "spark": "#cf222e"}
    width, height, left, top, bottom = 900, 420, 60, 40, 80
    group = (width - left - 20) / max(1, len(pipelines))
    bar = group * 0.8 / max(1, len(engines))
    ratios = [r for p in pipelines for e in engines if (r := results[p][e].get("ratio"))]
    top_ratio = max(2.0, min(12.0, max(ratios or [1.0])))
    scale = (height - top - bottom) / top_ratio
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="20" font-size="14">Median wall time relative to Nightshift embedded (lower is better; capped at {top_ratio:g}x)</text>']
    base = height - bottom
    for tick in range(0, int(top_ratio) + 1):
        y = base - tick * scale
        out.append(f'<line x1="{left}" x2="{width - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{tick}x</text>')
    for i, p in enumerate(pipelines):
        x0 = left + i * group + group * 0.1
        for j, e in enumerate(engines):
            ratio = results[p][e].get("ratio")
            if ratio is None:
                continue
            h = min(ratio, top_ratio) * scale
            x = x0 + j * bar
            out.append(f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" fill="{colors[e]}"><title>{e} {p}: {ratio:.2f}x</title></rect>')
            out.append(f'<text x="{x + bar / 2:.1f}" y="{base - h - 3:.1f}" text-anchor="middle" font-size="9">{ratio:.1f}</text>')
        out.append(f'<text x="{x0 + group * 0.4:.1f}" y="{base + 16}" text-anchor="middle">{p}</text>')
    for j, e in enumerate(engines):
        out.append(f'<rect x="{left + j * 130}" y="{height - 30}" width="12" height="12" fill="{colors[e]}"/>')
        out.append(f'<text x="{left + j * 130 + 16}" y="{height - 20}">{e}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nightshift", default=os.environ.get("NIGHTSHIFT_BIN", "nightshift"))
    parser.add_argument("--scale", type=float, default=1)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--memory-limit", help="Nightshift's --memory-limit (and the cluster workers')")
    parser.add_argument("--data", default=os.path.join(HERE, "data"), help="where TPC-H is generated")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--no-check", action="store_true", help="skip the result comparison")
    args = parser.parse_args()
    pipelines = args.pipelines.split(",")
    engines = args.engines.split(",")
    data = generate(args.scale, args.parts, args.data)
    os.makedirs(args.out, exist_ok=True)
    workdir = os.path.join(args.out, "work")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    cluster = Cluster(args.nightshift, workdir, 2, args.memory_limit) if "cluster" in engines else None
    runs = {p: {e: [] for e in engines} for p in pipelines}
    checks = {p: {} for p in pipelines}
    notes = {p: {} for p in pipelines}
    try:
        for round_no in range(args.runs):
            for p in pipelines:
                order = engines[:]
                random.shuffle(order)
                for e in order:
                    elapsed, rss, report, result = run_once(e, p, args, data, workdir, cluster)
                    runs[p][e].append((elapsed, rss))
                    log(f"round {round_no + 1} {p:16} {e:10} {elapsed:7.2f} s  {rss / 2**20:7.0f} MiB")
                    if report:
                        notes[p][e] = files_per_partition(report)
                    if round_no == 0 and not args.no_check:
                        checks[p][e] = checksum(result())
    finally:
        if cluster:
            cluster.stop()
    results = {}
    failures = []
    for p in pipelines:
        results[p] = {}
        base = statistics.median(t for t, _ in runs[p]["embedded"]) if "embedded" in engines else None
        for e in engines:
            times = [t for t, _ in runs[p][e]]
            median = statistics.median(times)
            results[p][e] = {
                "median_s": median,
                "times_s": times,
                "peak_rss_bytes": max(r for _, r in runs[p][e]),
                "ratio": median / base if base else None,
                "note": notes[p].get(e, ""),
            }
        if checks[p]:
            reference = next(iter(checks[p].values()))
            for e, c in checks[p].items():
                if c != reference:
                    failures.append(f"{p}: {e} differs: {c} vs {reference}")
            results[p]["_check"] = {"engines": sorted(checks[p]), "rows": reference["rows"],
                                    "agree": not any(f.startswith(p + ":") for f in failures)}
    write_report(args, pipelines, engines, results, failures)
    if failures:
        for f in failures:
            log("MISMATCH " + f)
        sys.exit(1)


def write_report(args, pipelines, engines, results, failures):
    lines = [f"TPC-H SF{args.scale:g} (`--parts={args.parts}`), median of {args.runs} interleaved run(s); "
             f"ratio = median ÷ Nightshift embedded's; peak RSS = the engine's processes.", ""]
    lines.append("| pipeline | rows | " + " | ".join(engines) + " |")
    lines.append("|---|---:|" + "---:|" * len(engines))
    for p in pipelines:
        check = results[p].get("_check", {})
        rows = f"{check['rows']:,}" + ("" if check.get("agree") else " (MISMATCH)") if check else "?"
        cells = []
        for e in engines:
            r = results[p][e]
            ratio = f" = {r['ratio']:.2f}×" if r["ratio"] is not None and e != "embedded" else ""
            cells.append(f"{r['median_s']:.2f} s{ratio}, {r['peak_rss_bytes'] / 2**30:.2f} GiB")
        lines.append(f"| {p} | {rows} | " + " | ".join(cells) + " |")
    notes = [f"- {p}: " + "; ".join(f"{e} {results[p][e]['note']}" for e in engines if results[p][e]["note"])
             for p in pipelines if any(results[p][e]["note"] for e in engines)]
    if notes:
        lines += ["", "Files written by Nightshift:", ""] + notes
    if failures:
        lines += ["", "Result mismatches:", ""] + [f"- {f}" for f in failures]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    svg_chart(results, pipelines, engines, os.path.join(args.out, "results.svg"))
    print(text)


if __name__ == "__main__":
    main()
