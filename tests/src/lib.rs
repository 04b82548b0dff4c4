//! Test harness: a scratch directory with data, specs and a warehouse; runs pipelines in the
//! embedded mode; computes reference results with plain DataFusion; reads tables back with
//! PyIceberg and DuckDB (tests/py/read_table.py).

pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionConfig, SessionContext};
use nightshift::embedded::{EmbeddedOptions, run_embedded};
use nightshift_coordinator::{JobError, JobOptions, JobReport};
use nightshift_core::ids::JobId;
use serde_json::Value;
use tempfile::TempDir;

/// A pipeline under test: `<root>/data`, `<root>/pipeline.toml`, `<root>/warehouse`.
pub struct Sandbox {
    pub root: TempDir,
}

/// How a source is registered for the reference run.
pub enum RefSource<'a> {
    Parquet(&'a str, &'a str),
    Csv(&'a str, &'a str, arrow::datatypes::SchemaRef),
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox {
            root: tempfile::Builder::new()
                .prefix("nightshift-test-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    pub fn warehouse(&self) -> PathBuf {
        self.path("warehouse")
    }

    /// Writes a file relative to the sandbox, creating directories.
    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, contents).expect("write");
        path
    }

    /// TPC-H example data under `data/` (scale 0.002: 3,000 orders, ~12,000 line items).
    pub fn tpch(&self) {
        nightshift::example_data::generate(&self.path("data"), 0.002, 4).expect("generate tpch");
    }

    /// Writes `pipeline.toml`.
    pub fn spec(&self, toml: &str) -> PathBuf {
        self.write("pipeline.toml", toml)
    }

    /// Runs `pipeline.toml` in the embedded mode.
    pub async fn run(
        &self,
        workers: usize,
        partitions: Option<usize>,
        job_id: Option<&str>,
    ) -> Result<JobReport, JobError> {
        self.run_with(workers, partitions, job_id, &[]).await
    }

    pub async fn run_with(
        &self,
        workers: usize,
        partitions: Option<usize>,
        job_id: Option<&str>,
        params: &[(&str, &str)],
    ) -> Result<JobReport, JobError> {
        let embedded = EmbeddedOptions::new(self.warehouse(), workers);
        self.run_embedded(embedded, partitions, job_id, params)
            .await
    }

    /// Runs `pipeline.toml` in the embedded mode cut into stages that exchange rows through
    /// shuffle files, as a cluster runs it.
    pub async fn run_staged(
        &self,
        workers: usize,
        partitions: Option<usize>,
    ) -> Result<JobReport, JobError> {
        let mut embedded = EmbeddedOptions::new(self.warehouse(), workers);
        embedded.staged = true;
        self.run_embedded(embedded, partitions, None, &[]).await
    }

    /// Runs `pipeline.toml` in the embedded mode with `embedded`'s settings.
    pub async fn run_embedded(
        &self,
        embedded: EmbeddedOptions,
        partitions: Option<usize>,
        job_id: Option<&str>,
        params: &[(&str, &str)],
    ) -> Result<JobReport, JobError> {
        let workers = embedded.workers;
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let spec = nightshift_spec::load_spec(&self.path("pipeline.toml"), &params)
            .map_err(|e| JobError::Invalid(e.into()))?;
        let options = JobOptions {
            job_id: job_id
                .map(|j| JobId::parse(j).expect("job id"))
                .unwrap_or_else(JobId::generate),
            workers,
            target_task_bytes: None,
            partitions,
            max_task_attempts: None,
        };
        run_embedded(&spec, &embedded, &options, &|_| {}).await
    }

    /// Runs `sql` with plain DataFusion (one node, no Nightshift code) and writes the rows to
    /// `reference.parquet` for the reader script.
    pub async fn reference(&self, sql: &str, sources: &[RefSource<'_>]) -> PathBuf {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(3));
        for source in sources {
            match source {
                RefSource::Parquet(name, rel) => ctx
                    .register_parquet(
                        *name,
                        self.path(rel).to_str().unwrap(),
                        ParquetReadOptions::default(),
                    )
                    .await
                    .expect("register parquet"),
                RefSource::Csv(name, rel, schema) => ctx
                    .register_csv(
                        *name,
                        self.path(rel).to_str().unwrap(),
                        CsvReadOptions::new().schema(schema),
                    )
                    .await
                    .expect("register csv"),
            }
        }
        let batches = ctx
            .sql(sql)
            .await
            .expect("reference sql")
            .collect()
            .await
            .expect("reference run");
        let path = self.path("reference.parquet");
        write_parquet(&path, &batches);
        path
    }

    /// What PyIceberg and DuckDB read from `table` (and the reference file, if given).
    pub fn read_table(&self, table: &str, reference: Option<&Path>) -> Value {
        self.read_table_with(table, reference, &[])
    }

    /// [`read_table`](Self::read_table) with more reader arguments (`--every-snapshot`,
    /// `--references`, `--rollback-to ID`).
    pub fn read_table_with(&self, table: &str, reference: Option<&Path>, extra: &[&str]) -> Value {
        let mut cmd = reader_command(table, reference);
        cmd.arg("--warehouse").arg(self.warehouse()).args(extra);
        run_reader(cmd)
    }

    /// Every file under the warehouse except the catalog database and the runs' report
    /// records (`.nightshift/runs/`, kept for `nightshift report`, failed runs included),
    /// relative and sorted.
    pub fn warehouse_files(&self) -> Vec<String> {
        let mut files = Vec::new();
        collect_files(&self.warehouse(), &self.warehouse(), &mut files);
        files.retain(|f| !f.starts_with("catalog.db") && !f.starts_with(".nightshift/runs/"));
        files.sort();
        files
    }

    /// Data files (Parquet) under the warehouse.
    pub fn data_files(&self) -> Vec<String> {
        self.warehouse_files()
            .into_iter()
            .filter(|f| f.contains("/data/") && f.ends_with(".parquet"))
            .collect()
    }

    /// Runs the `nightshift` binary with `args` in the sandbox directory.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(nightshift_bin())
            .args(args)
            .current_dir(self.root.path())
            .env_remove("RUST_LOG")
            .output()
            .expect("run nightshift")
    }

    /// `nightshift maintain TABLE --output json ARGS`, which must succeed: its JSON report.
    pub fn maintain(&self, table: &str, args: &[&str]) -> Value {
        let out = self.cli(&[&["maintain", table, "--output", "json"], args].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("maintenance json")
    }
}

pub(crate) fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(root, &path, out);
        } else {
            out.push(path.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

/// `tests/py/read_table.py --table TABLE [--reference FILE]`; callers add the catalog.
pub fn reader_command(table: &str, reference: Option<&Path>) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/read_table.py");
    let mut cmd = Command::new(python());
    cmd.arg(script).arg("--table").arg(table);
    if let Some(reference) = reference {
        cmd.arg("--reference").arg(reference);
    }
    cmd
}

/// Runs the reader script and parses its JSON.
pub fn run_reader(cmd: Command) -> Value {
    json_output(cmd)
}

/// Runs `cmd`, which must succeed (its stderr is the failure message), and parses its
/// stdout as JSON.
pub fn json_output<T: serde::de::DeserializeOwned>(mut cmd: Command) -> T {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "json from {cmd:?}: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The first rows (up to three, sorted) a reader saw, from `read_table.py`'s JSON for one
/// reader (`read["pyiceberg"]`), each as its canonical JSON text.
pub fn first_rows(reader: &Value) -> Vec<String> {
    reader["first"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `python -c script args...` (the interpreter with the readers), its stdout as JSON.
pub fn python_json<T: serde::de::DeserializeOwned>(script: &str, args: &[&str]) -> T {
    let mut cmd = Command::new(python());
    cmd.arg("-c").arg(script).args(args);
    json_output(cmd)
}

impl Sandbox {
    /// Runs Python `body` with `t`, the sandbox warehouse's table `table` loaded by
    /// PyIceberg; `body` ends by `json.dump`-ing its answer to `sys.stdout`.
    pub fn with_pyiceberg_table<T: serde::de::DeserializeOwned>(
        &self,
        table: &str,
        body: &str,
    ) -> T {
        let script = format!(
            "import json, sys\n\
             from pyiceberg.catalog.sql import SqlCatalog\n\
             w = sys.argv[1]\n\
             t = SqlCatalog('nightshift', uri=f'sqlite:///{{w}}/catalog.db', warehouse=w).load_table(sys.argv[2])\n\
             {body}\n"
        );
        python_json(&script, &[&self.warehouse().display().to_string(), table])
    }
}

/// What `tests/py/check_report.py` reads from a job report `page` (headings, stage boxes,
/// task bars, checks, elements, text); the page must be valid HTML5 (html5lib, strict).
pub fn check_report_page(page: &str) -> Value {
    use std::io::Write;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/check_report.py");
    let mut child = Command::new(python())
        .arg(script)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run check_report.py");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(page.as_bytes())
        .expect("write the page");
    let out = child.wait_with_output().expect("check_report.py ends");
    assert!(out.status.success(), "check_report.py failed");
    let seen: Value = serde_json::from_slice(&out.stdout).expect("check_report.py prints JSON");
    assert_eq!(seen["valid"], true, "{seen:#}\n{page}");
    seen
}

/// The Python interpreter with pyiceberg and duckdb (`NIGHTSHIFT_PYTHON`, else `python3`).
pub fn python() -> String {
    std::env::var("NIGHTSHIFT_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The `nightshift` binary built next to this test binary.
pub fn nightshift_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("nightshift");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p nightshift` first",
        bin.display()
    );
    bin
}

pub fn write_parquet(path: &Path, batches: &[RecordBatch]) {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
    let file = std::fs::File::create(path).expect("create parquet");
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, schema, None).expect("parquet writer");
    for batch in batches {
        writer.write(batch).expect("write batch");
    }
    writer.close().expect("close parquet");
}

/// Asserts that PyIceberg, DuckDB and the reference agree, and returns the row count.
pub fn assert_matches_reference(read: &Value) -> u64 {
    let reference = &read["reference"];
    for reader in ["pyiceberg", "duckdb"] {
        assert_eq!(
            read[reader]["rows"], reference["rows"],
            "{reader} row count differs from DataFusion's: {read:#}"
        );
        assert_eq!(
            read[reader]["checksum"], reference["checksum"],
            "{reader} content differs from DataFusion's: {read:#}"
        );
    }
    reference["rows"].as_u64().expect("rows")
}

/// Number of snapshots of a table as PyIceberg sees it (0 if the table does not exist).
pub fn snapshot_count(read: &Value) -> usize {
    read["snapshots"].as_array().map_or(0, Vec::len)
}

/// The data files among `files` (paths of any form) that no snapshot references, by the
/// reader's `--references` list (PyIceberg's view, independent of Nightshift's code).
pub fn unreferenced<'a>(files: &'a [String], read: &Value) -> Vec<&'a String> {
    not_named_in(files, read, "references")
}

/// The data files among `files` that no snapshot reads (named by no manifest entry that is
/// not `DELETED`), by the reader's `--references` output: what expiry and orphan removal
/// may delete.
pub fn unread<'a>(files: &'a [String], read: &Value) -> Vec<&'a String> {
    not_named_in(files, read, "live_references")
}

/// The files among `files` whose names the reader's `list` does not hold.
fn not_named_in<'a>(files: &'a [String], read: &Value, list: &str) -> Vec<&'a String> {
    let references: std::collections::HashSet<&str> = read[list]
        .as_array()
        .expect("read with --references")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    files
        .iter()
        .filter(|f| !references.contains(f.rsplit('/').next().unwrap_or(f)))
        .collect()
}
