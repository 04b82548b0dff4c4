//! Commits racing on one table, with real data files and the real catalogs (SQLite, the
//! embedded default, and PostgreSQL): one job id lands in exactly one snapshot however many
//! coordinators commit it at once; different jobs all land, one after the other.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::TaskContext;
use iceberg::Catalog;
use nightshift_coordinator::job::table_output;
use nightshift_core::ids::JobId;
use nightshift_core::names::AttemptId;
use nightshift_core::storage::Location;
use nightshift_core::table::{
    CatalogConfig, CommitOutcome, JobCommit, WrittenWith, commit_job_snapshot, ensure_table,
    find_job_snapshot, open_catalog, parse_table_ident, write_data_files,
};
use nightshift_spec::{PartitionField, PartitionTransform, WriteMode};
use nightshift_tests::cluster::uuid_like;
use nightshift_tests::{Sandbox, reader_command, run_reader};

const TABLE: &str = "races.events";

struct Racing {
    sandbox: Sandbox,
    /// The catalog name when the catalog is on PostgreSQL (else SQLite in the warehouse).
    postgres: Option<String>,
    config: CatalogConfig,
    catalog: Arc<dyn Catalog>,
    ident: iceberg::TableIdent,
}

impl Racing {
    async fn sqlite() -> Self {
        let sandbox = Sandbox::new();
        let warehouse = Location::parse(sandbox.warehouse().to_str().unwrap(), "/".as_ref())
            .expect("warehouse");
        let config = CatalogConfig::embedded(&warehouse).expect("catalog");
        Self::with(sandbox, config, None).await
    }

    async fn postgres() -> Self {
        let sandbox = Sandbox::new();
        let warehouse = Location::parse(sandbox.warehouse().to_str().unwrap(), "/".as_ref())
            .expect("warehouse");
        let name = format!("races{}", &uuid_like()[..8]);
        let config = CatalogConfig::Sql {
            name: name.clone(),
            uri: "postgres://root@127.0.0.1:5432/test".into(),
            warehouse,
        };
        Self::with(sandbox, config, Some(name)).await
    }

    async fn with(sandbox: Sandbox, config: CatalogConfig, postgres: Option<String>) -> Self {
        let catalog = open_catalog(&config).await.expect("open catalog");
        let ident = parse_table_ident(TABLE).unwrap();
        let partition_by = [PartitionField {
            column: "kind".into(),
            transform: PartitionTransform::Identity,
        }];
        ensure_table(
            catalog.as_ref(),
            &ident,
            &schema(),
            &partition_by,
            &Default::default(),
        )
        .await
        .expect("create table");
        Racing {
            sandbox,
            postgres,
            config,
            catalog,
            ident,
        }
    }

    /// Writes rows `ids` as a final-stage task of `job` (attempt `attempt`) would.
    async fn write(&self, job: &JobId, attempt: u32, ids: std::ops::Range<i64>) -> Vec<String> {
        let table = self.catalog.load_table(&self.ident).await.unwrap();
        let out = table_output(&table, None, Vec::new()).unwrap();
        let kinds: Vec<String> = ids.clone().map(|i| format!("k{}", i % 3)).collect();
        let batch = RecordBatch::try_new(
            Arc::new(schema()),
            vec![
                Arc::new(Int64Array::from_iter_values(ids)),
                Arc::new(StringArray::from(kinds)),
            ],
        )
        .unwrap();
        let input =
            MemorySourceConfig::try_new_exec(&[vec![batch]], Arc::new(schema()), None).unwrap();
        let prefix = AttemptId::new(job.clone(), 1, 0, attempt).data_file_prefix();
        write_data_files(input, 0, &out, prefix, Arc::new(TaskContext::default()))
            .await
            .expect("write data files")
            .data_files_json
    }

    /// Commits each file set concurrently, each as `job` of its pair, from its own task.
    async fn race(
        &self,
        commits: Vec<(JobId, Vec<String>)>,
        mode: WriteMode,
    ) -> Vec<CommitOutcome> {
        let table = self.catalog.load_table(&self.ident).await.unwrap();
        let written_with = WrittenWith::current(&table);
        let handles: Vec<_> = commits
            .into_iter()
            .map(|(job, files)| {
                let (catalog, config, ident) = (
                    self.catalog.clone(),
                    self.config.clone(),
                    self.ident.clone(),
                );
                tokio::spawn(async move {
                    let commit = JobCommit {
                        job: &job,
                        mode,
                        data_files_json: &files,
                        written_with,
                        merge_base: None,
                        merge_files: None,
                        summary: Default::default(),
                        schema_change: None,
                        set_aside_partitions_json: &[],
                    };
                    commit_job_snapshot(catalog.as_ref(), &config, &ident, commit).await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for handle in handles {
            outcomes.push(
                handle
                    .await
                    .unwrap()
                    .expect("commit")
                    .expect("files to commit"),
            );
        }
        outcomes
    }

    async fn snapshots_of(&self, job: &JobId) -> usize {
        let table = self.catalog.load_table(&self.ident).await.unwrap();
        table
            .metadata()
            .snapshots()
            .filter(|s| {
                s.summary().additional_properties.get("nightshift.job-id") == Some(&job.to_string())
            })
            .count()
    }

    fn read(&self) -> serde_json::Value {
        match &self.postgres {
            Some(name) => {
                let mut cmd = reader_command(TABLE, None);
                cmd.args(["--catalog-name", name])
                    .args([
                        "--catalog-uri",
                        "postgresql+psycopg2://root@127.0.0.1:5432/test",
                    ])
                    .arg("--catalog-warehouse")
                    .arg(self.sandbox.warehouse());
                run_reader(cmd)
            }
            None => self.sandbox.read_table(TABLE, None),
        }
    }
}

fn schema() -> Schema {
    Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("kind", DataType::Utf8, true),
    ])
}

/// Six coordinators commit the same job at once, each with the files of its own attempt.
async fn one_job_lands_once(racing: Racing, mode: WriteMode) {
    let job = JobId::parse("nightly-2024-06-01").unwrap();
    let mut commits = Vec::new();
    for attempt in 1..=6 {
        let ids = attempt as i64 * 100..attempt as i64 * 100 + 10;
        commits.push((job.clone(), racing.write(&job, attempt, ids).await));
    }
    let outcomes = racing.race(commits, mode).await;
    let fresh: Vec<_> = outcomes.iter().filter(|o| !o.already_committed).collect();
    assert_eq!(fresh.len(), 1, "exactly one commit lands: {outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| o.snapshot_id == fresh[0].snapshot_id
                && o.committed_files == fresh[0].committed_files),
        "every racer reports the one snapshot and its files: {outcomes:?}"
    );
    assert_eq!(racing.snapshots_of(&job).await, 1);
    let read = racing.read();
    assert_eq!(read["pyiceberg"]["rows"], 10, "{read:#}");
    assert_eq!(read["duckdb"]["rows"], 10, "{read:#}");
}

/// Four different jobs overwrite the table at once: all land, one after the other, and the
/// table holds the rows of the last.
async fn different_jobs_all_land(racing: Racing) {
    let jobs: Vec<JobId> = (0..4).map(|_| JobId::generate()).collect();
    let mut commits = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let ids = i as i64 * 100..i as i64 * 100 + 5 + i as i64;
        commits.push((job.clone(), racing.write(job, 1, ids).await));
    }
    let outcomes = racing.race(commits, WriteMode::Overwrite).await;
    assert!(
        outcomes.iter().all(|o| !o.already_committed),
        "{outcomes:?}"
    );
    let table = racing.catalog.load_table(&racing.ident).await.unwrap();
    let current = table.metadata().current_snapshot().unwrap();
    let last = jobs
        .iter()
        .position(|j| find_job_snapshot(&table, j) == Some(current.snapshot_id()))
        .expect("the current snapshot is one of the jobs'");
    let read = racing.read();
    assert_eq!(read["snapshots"].as_array().unwrap().len(), 4, "{read:#}");
    assert_eq!(read["pyiceberg"]["rows"], 5 + last as u64, "{read:#}");
    assert_eq!(read["duckdb"]["rows"], 5 + last as u64, "{read:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_appending_job_lands_once_sqlite() {
    one_job_lands_once(Racing::sqlite().await, WriteMode::Append).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_overwriting_job_lands_once_sqlite() {
    one_job_lands_once(Racing::sqlite().await, WriteMode::Overwrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_appending_job_lands_once_postgres() {
    one_job_lands_once(Racing::postgres().await, WriteMode::Append).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_overwriting_job_lands_once_postgres() {
    one_job_lands_once(Racing::postgres().await, WriteMode::Overwrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_overwrites_of_different_jobs_all_land_postgres() {
    different_jobs_all_land(Racing::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_committed_with_the_partition_spec_they_were_written_with() {
    let racing = Racing::sqlite().await;
    let job = JobId::parse("written-before-evolution").unwrap();
    let files = racing.write(&job, 1, 0..30).await;
    let table = racing.catalog.load_table(&racing.ident).await.unwrap();
    let written_with = WrittenWith::current(&table);
    // Another engine evolves the table's partition spec while the job runs.
    let warehouse = racing.sandbox.warehouse();
    let evolve = format!(
        "from pyiceberg.catalog.sql import SqlCatalog\n\
         c = SqlCatalog('nightshift', uri='sqlite:///{w}/catalog.db', warehouse='{w}')\n\
         t = c.load_table('{TABLE}')\n\
         with t.update_spec() as u:\n    u.add_identity('id')\n",
        w = warehouse.display()
    );
    let status = std::process::Command::new(nightshift_tests::python())
        .args(["-c", &evolve])
        .status()
        .unwrap();
    assert!(status.success());
    let table = racing.catalog.load_table(&racing.ident).await.unwrap();
    assert_ne!(
        table.metadata().default_partition_spec_id(),
        written_with.partition_spec_id
    );
    let commit = JobCommit {
        job: &job,
        mode: WriteMode::Overwrite,
        data_files_json: &files,
        written_with,
        merge_base: None,
        merge_files: None,
        summary: Default::default(),
        schema_change: None,
        set_aside_partitions_json: &[],
    };
    commit_job_snapshot(
        racing.catalog.as_ref(),
        &racing.config,
        &racing.ident,
        commit,
    )
    .await
    .expect("committed with the spec the files were written with");
    let read = racing.read();
    assert_eq!(read["pyiceberg"]["rows"], 30, "{read:#}");
    assert_eq!(read["duckdb"]["rows"], 30, "{read:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_lands_only_on_the_snapshot_it_read() {
    let racing = Racing::sqlite().await;
    let table = racing.catalog.load_table(&racing.ident).await.unwrap();
    let written_with = WrittenWith::current(&table);
    let merge = JobId::parse("merge-read-empty-table").unwrap();
    let merged = racing.write(&merge, 1, 0..10).await;
    // Another job appends after the merge read the (empty) table.
    let other = JobId::parse("append-meanwhile").unwrap();
    let appended = racing.write(&other, 1, 100..105).await;
    racing
        .race(vec![(other, appended)], WriteMode::Append)
        .await;
    let commit = JobCommit {
        job: &merge,
        mode: WriteMode::Merge,
        data_files_json: &merged,
        written_with,
        merge_base: Some(None),
        merge_files: None,
        summary: Default::default(),
        schema_change: None,
        set_aside_partitions_json: &[],
    };
    let err = commit_job_snapshot(
        racing.catalog.as_ref(),
        &racing.config,
        &racing.ident,
        commit,
    )
    .await
    .expect_err("the table changed under the merge")
    .to_string();
    assert!(err.contains("changed while the merge ran"), "{err}");
    let read = racing.read();
    assert_eq!(
        read["pyiceberg"]["rows"], 5,
        "the append is not lost: {read:#}"
    );
}
