//! Committing a job's data files as one snapshot, exactly once.
//!
//! Architecture invariant: only the coordinator commits, once per job. The snapshot summary
//! carries `nightshift.job-id`; a job whose id is already in the table's history is never
//! committed again, so the table itself is the record of what was published. The check is
//! part of every commit attempt, not only a look before it: each attempt builds on a table
//! loaded with the job absent and swaps only if `main` still points where it did.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use iceberg::spec::{
    DataFile, Literal, ManifestStatus, PartitionSpecRef, SchemaRef, Struct, StructType, Type,
    deserialize_data_file_from_json,
};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::{Catalog, TableIdent};
use nightshift_spec::WriteMode;
use tracing::{info, warn};

use super::catalog::CatalogConfig;
use super::evolution::{SchemaChange, schema_updates, with_updates_applied};
use super::job_guard::JobGuardCatalog;
use super::overwrite::{Replace, produce_overwrite};
use super::references::TableReferences;
use super::swap::{SwapError, swap_table_metadata};
use crate::error::{CoreError, Result};
use crate::ids::JobId;

/// Snapshot summary key holding the job id.
pub const JOB_ID_PROPERTY: &str = "nightshift.job-id";
/// Snapshot summary key holding the pipeline name.
pub const PIPELINE_PROPERTY: &str = "nightshift.pipeline";
/// The summary property naming the maintenance a snapshot did (`compact`, `retention`).
pub const MAINTENANCE_PROPERTY: &str = "nightshift.maintenance";

/// Attempts at an overwrite swap before the job fails (each one after a conflict with
/// another writer or an unknown outcome), and at an append once iceberg-rust's own retries
/// (four, in lockstep with every other writer's) have conflicted.
const MAX_SWAP_ATTEMPTS: u32 = 8;

/// The pause before commit attempt `attempt + 1` after a conflict: "full jitter" up to a
/// ceiling that doubles from 100 ms to 6.4 s, `unit` (in `[0, 1)`) picking the point, so
/// that writers that conflicted together do not retry together.
pub(crate) fn conflict_pause(attempt: u32, unit: f64) -> Duration {
    let ceiling = Duration::from_millis(100 << attempt.min(6));
    ceiling
        .mul_f64(unit.clamp(0.0, 1.0))
        .max(Duration::from_millis(10))
}

/// A random point in `[0, 1)` for [`conflict_pause`].
fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u64_pair().0 >> 11) as f64 / (1u64 << 53) as f64
}

/// What a job publishes.
#[derive(Debug)]
pub struct JobCommit<'a> {
    pub job: &'a JobId,
    pub mode: WriteMode,
    /// The final stage's data files, serialized by the workers that wrote them.
    pub data_files_json: &'a [String],
    /// The schema and partition spec the workers wrote them with (the table's when the job
    /// planned): the files are read back with these, not with whatever is current now.
    pub written_with: WrittenWith,
    /// For [`WriteMode::Merge`]: the snapshot the job read the table's rows from (`None`: it
    /// had none). The merge replaces rows it read, so it lands only on that snapshot.
    pub merge_base: Option<Option<i64>>,
    /// For [`WriteMode::Merge`]: the data files of that snapshot the merge rewrote (the
    /// others stay); `None` replaces every row.
    pub merge_files: Option<&'a HashSet<String>>,
    /// Snapshot summary properties (pipeline, params); the job id is added.
    pub summary: HashMap<String, String>,
    /// The evolved schema the files were written with, added in the same commit
    /// (`schema_evolution = "add_columns"`); `None` when the table's schema serves.
    pub schema_change: Option<&'a SchemaChange>,
    /// For [`WriteMode::OverwritePartitions`]: the partitions (of the spec the files were
    /// written with, as the workers serialized them) of the rows a check set aside. They are
    /// replaced as the files' partitions are, so a partition whose new rows all went to the
    /// rejects table keeps none of its old rows.
    pub set_aside_partitions_json: &'a [String],
}

/// Which schema and partition spec data files were written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenWith {
    pub schema_id: i32,
    pub partition_spec_id: i32,
}

impl WrittenWith {
    /// The table's current schema and default spec: what tasks planned now will write with.
    pub fn current(table: &Table) -> Self {
        let metadata = table.metadata();
        WrittenWith {
            schema_id: metadata.current_schema_id(),
            partition_spec_id: metadata.default_partition_spec_id(),
        }
    }
}

/// The result of [`commit_job_snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    pub snapshot_id: i64,
    /// True when the job had been committed before (by an earlier run, or by another
    /// coordinator meanwhile) and nothing new was written.
    pub already_committed: bool,
    /// Paths of the data files the job's snapshot added: they must survive any cleanup.
    pub committed_files: HashSet<String>,
}

/// `ns.table` (or `a.b.table`) as an Iceberg identifier.
pub fn parse_table_ident(name: &str) -> Result<TableIdent> {
    Ok(TableIdent::from_strs(name.split('.'))?)
}

/// The snapshot committed by `job`, if any.
pub fn find_job_snapshot(table: &Table, job: &JobId) -> Option<i64> {
    table
        .metadata()
        .snapshots()
        .find(|s| {
            s.summary()
                .additional_properties
                .get(JOB_ID_PROPERTY)
                .is_some_and(|id| id == job.as_str())
        })
        .map(|s| s.snapshot_id())
}

/// Commits the job's files as one snapshot tagged with its id: an append, for
/// [`WriteMode::Overwrite`] a snapshot that replaces every row of the table, for
/// [`WriteMode::OverwritePartitions`] one that replaces the rows of the partitions the files
/// fall in. Returns `None`
/// when there is nothing to commit (an empty append, an empty overwrite of an empty table).
/// A job already in the table's history is not committed again.
pub async fn commit_job_snapshot(
    catalog: &dyn Catalog,
    config: &CatalogConfig,
    ident: &TableIdent,
    commit: JobCommit<'_>,
) -> Result<Option<CommitOutcome>> {
    let JobCommit {
        job,
        mode,
        data_files_json,
        written_with,
        merge_base,
        merge_files,
        mut summary,
        schema_change,
        set_aside_partitions_json,
    } = commit;
    let table = catalog.load_table(ident).await?;
    if let Some(outcome) = committed_before(&table, job).await? {
        return Ok(Some(outcome));
    }
    refuse_if_overtaken(&table, &summary)?;
    let layout = written_layout(&table, written_with, schema_change)?;
    let files = decode_data_files(&layout, data_files_json)?;
    let set_aside = decode_partitions(&table, &layout.2, set_aside_partitions_json)?;
    ensure_files_exist(&table, job, &files).await?;
    summary.insert(JOB_ID_PROPERTY.to_string(), job.to_string());
    let nothing_to_replace = table.metadata().current_snapshot().is_none();
    // An empty result appends nothing and replaces no partition, unless rows set aside fall
    // in one; an empty full overwrite empties the table, unless there is nothing to empty.
    let replaces_rows = match mode {
        WriteMode::Overwrite => true,
        WriteMode::OverwritePartitions => !set_aside.is_empty(),
        WriteMode::Merge => merge_files.is_none_or(|files| !files.is_empty()),
        _ => false,
    };
    if files.is_empty() && (!replaces_rows || nothing_to_replace) {
        return Ok(None);
    }
    match mode {
        // iceberg-rust's append cannot carry a schema of ours: a schema change goes through
        // our own snapshot, replacing nothing.
        WriteMode::Append if schema_change.is_none() => {
            append(catalog, table, job, files, summary).await.map(Some)
        }
        WriteMode::Compact => {
            // The files the job rewrote, chosen from snapshot `read_at`: they leave the
            // snapshot (not storage: older snapshots keep them until expiry), the job's come
            // in with the same rows; appends since are kept, and a commit since that
            // removed one of them or added delete files refuses this one.
            let (Some(replaced), Some(Some(read_at))) = (merge_files, merge_base) else {
                return Err(CoreError::Protocol(
                    "a compaction commit needs the files it rewrote and the snapshot it read"
                        .into(),
                ));
            };
            let target = OverwriteTarget {
                schema_change,
                ..OverwriteTarget::file_change(
                    (config, ident),
                    written_with.partition_spec_id,
                    Replace::Files(replaced),
                    read_at,
                )
            };
            summary.insert(MAINTENANCE_PROPERTY.to_string(), "compact".to_string());
            overwrite(catalog, &target, job, files, summary)
                .await
                .map(Some)
        }
        WriteMode::Append
        | WriteMode::Overwrite
        | WriteMode::OverwritePartitions
        | WriteMode::Merge => {
            let replace = match (mode, merge_files) {
                (WriteMode::Append, _) => Replace::Nothing,
                (WriteMode::OverwritePartitions, _) => Replace::PartitionsOf(&set_aside),
                (WriteMode::Merge, Some(files)) => Replace::Rows(files),
                (WriteMode::Overwrite | WriteMode::Merge | WriteMode::Compact, _) => Replace::All,
            };
            let target = OverwriteTarget {
                config,
                ident,
                spec_id: written_with.partition_spec_id,
                replace,
                base: if mode == WriteMode::Merge {
                    merge_base
                } else {
                    None
                },
                schema_change,
                no_deletes_since: None,
            };
            overwrite(catalog, &target, job, files, summary)
                .await
                .map(Some)
        }
    }
}

/// The snapshots of the table's current history: its current snapshot and its ancestors,
/// newest first (none for a table without a snapshot).
pub(crate) fn current_history(table: &Table) -> Vec<iceberg::spec::SnapshotRef> {
    let metadata = table.metadata_ref();
    match metadata.current_snapshot_id() {
        Some(current) => iceberg::util::snapshot::ancestors_of(&metadata, current).collect(),
        None => Vec::new(),
    }
}

/// Whether `snapshot_id` is in the table's current history (the current snapshot and its
/// ancestors): a snapshot a rollback left behind is not, though it stays in the metadata.
pub fn in_current_history(table: &Table, snapshot_id: i64) -> bool {
    current_history(table)
        .iter()
        .any(|s| s.snapshot_id() == snapshot_id)
}

/// The snapshot summaries of the table's current history, newest first.
pub(crate) fn history_summaries(table: &Table) -> Vec<HashMap<String, String>> {
    current_history(table)
        .iter()
        .map(|s| s.summary().additional_properties.clone())
        .collect()
}

/// A count a snapshot's `summary` gives under `key` (`added-records`, `added-data-files`,
/// `added-files-size`), 0 when it gives none.
pub fn summary_count(summary: &HashMap<String, String>, key: &str) -> u64 {
    summary.get(key).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// The rows the newest snapshot of the pipeline (under one of its `names`: its name, then
/// the names it had before) in the table's current history added, if there is one: what
/// `row_count`'s `max_change` compares a run with.
pub fn previous_run_rows(table: &Table, names: &[&str]) -> Option<u64> {
    current_history(table)
        .iter()
        .map(|s| &s.summary().additional_properties)
        .find(|summary| {
            summary
                .get(PIPELINE_PROPERTY)
                .is_some_and(|p| names.contains(&p.as_str()))
        })
        .map(|summary| summary_count(summary, "added-records"))
}

/// Fails a commit whose incremental sources another run of the pipeline consumed since the
/// job read them (see [`crate::incremental::overtaken`]).
pub(crate) fn refuse_if_overtaken(table: &Table, summary: &HashMap<String, String>) -> Result<()> {
    match crate::incremental::overtaken(summary, &history_summaries(table)) {
        Some(message) => Err(CoreError::Target {
            table: table.identifier().to_string(),
            message,
        }),
        None => Ok(()),
    }
}

/// The outcome of an earlier commit of `job`, if the table's history has one.
pub async fn committed_before(table: &Table, job: &JobId) -> Result<Option<CommitOutcome>> {
    let Some(snapshot_id) = find_job_snapshot(table, job) else {
        return Ok(None);
    };
    Ok(Some(CommitOutcome {
        snapshot_id,
        already_committed: true,
        committed_files: files_added_by(table, snapshot_id).await?,
    }))
}

/// Paths of the data files `snapshot_id` added.
async fn files_added_by(table: &Table, snapshot_id: i64) -> Result<HashSet<String>> {
    Ok(entries_added_by(table, snapshot_id)
        .await?
        .iter()
        .map(|e| e.file_path().to_string())
        .collect())
}

/// The manifest entries of the files `snapshot_id` added (data and delete files): the
/// `ADDED` entries of the manifests that snapshot wrote. None for a snapshot not in the
/// table's metadata.
pub(crate) async fn entries_added_by(
    table: &Table,
    snapshot_id: i64,
) -> iceberg::Result<Vec<iceberg::spec::ManifestEntryRef>> {
    let Some(snapshot) = table.metadata().snapshot_by_id(snapshot_id) else {
        return Ok(Vec::new());
    };
    let list = table.manifest_list_reader(snapshot).load().await?;
    let mut entries = Vec::new();
    for manifest_file in list
        .entries()
        .iter()
        .filter(|m| m.added_snapshot_id == snapshot_id && m.has_added_files())
    {
        let manifest = manifest_file.load_manifest(table.file_io()).await?;
        entries.extend(
            manifest
                .entries()
                .iter()
                .filter(|e| e.status() == ManifestStatus::Added)
                .cloned(),
        );
    }
    Ok(entries)
}

/// Fails the commit if a data file the job wrote is gone: a snapshot must never name a
/// file that does not exist. Something deleted it while the job ran (orphan removal with
/// too short an age, or the cleanup of another run under the same job id); the job fails
/// with nothing committed, and a rerun writes its files again.
async fn ensure_files_exist(table: &Table, job: &JobId, files: &[DataFile]) -> Result<()> {
    use futures::StreamExt;
    // Futures that own their path and FileIO: the stream then borrows nothing across awaits.
    let checks: Vec<_> = files
        .iter()
        .map(|file| {
            let io = table.file_io().clone();
            let path = file.file_path().to_string();
            async move {
                let exists = io.exists(&path).await;
                (path, exists)
            }
        })
        .collect();
    let checked: Vec<(String, iceberg::Result<bool>)> = futures::stream::iter(checks)
        .buffer_unordered(16)
        .collect()
        .await;
    let mut missing = Vec::new();
    for (path, exists) in checked {
        if !exists? {
            missing.push(path);
        }
    }
    match missing.first() {
        None => Ok(()),
        Some(first) => Err(CoreError::Task {
            message: format!(
                "{} data file(s) job {job} wrote are gone before its commit, e.g. {first}: something deleted them while the job ran (orphan removal, or the cleanup of another run with the same job id); nothing was committed",
                missing.len()
            ),
            retryable: false,
        }),
    }
}

/// The schema and partition spec (with its partition type) a job's files were written with.
fn written_layout(
    table: &Table,
    written_with: WrittenWith,
    schema_change: Option<&SchemaChange>,
) -> Result<(SchemaRef, PartitionSpecRef, StructType)> {
    let metadata = table.metadata();
    let missing = |what: &str, id: i32| CoreError::Target {
        table: table.identifier().to_string(),
        message: format!("the {what} {id} the job wrote with is no longer in the table"),
    };
    let schema = match schema_change {
        Some(change) => std::sync::Arc::new(change.schema.clone()),
        None => metadata
            .schema_by_id(written_with.schema_id)
            .ok_or_else(|| missing("schema", written_with.schema_id))?
            .clone(),
    };
    let spec = metadata
        .partition_spec_by_id(written_with.partition_spec_id)
        .ok_or_else(|| missing("partition spec", written_with.partition_spec_id))?
        .clone();
    let partition_type = spec.partition_type(&schema)?;
    Ok((schema, spec, partition_type))
}

/// The job's data files, as the workers serialized them with `layout`.
fn decode_data_files(
    (schema, spec, partition_type): &(SchemaRef, PartitionSpecRef, StructType),
    data_files_json: &[String],
) -> Result<Vec<DataFile>> {
    Ok(data_files_json
        .iter()
        .map(|json| deserialize_data_file_from_json(json, spec.spec_id(), partition_type, schema))
        .collect::<iceberg::Result<Vec<DataFile>>>()?)
}

/// Partition values of `partition_type` as the workers serialized them (a JSON object keyed
/// by partition field id).
fn decode_partitions(
    table: &Table,
    partition_type: &StructType,
    partitions_json: &[String],
) -> Result<Vec<Struct>> {
    let bad = |json: &str, why: String| CoreError::Target {
        table: table.identifier().to_string(),
        message: format!(
            "a task reported the partition {json}, which is not one of the table's: {why}"
        ),
    };
    let of_type = Type::Struct(partition_type.clone());
    partitions_json
        .iter()
        .map(|json| {
            let value = serde_json::from_str(json).map_err(|e| bad(json, e.to_string()))?;
            match Literal::try_from_json(value, &of_type) {
                Ok(Some(Literal::Struct(partition))) => Ok(partition),
                Ok(_) => Err(bad(json, "not a struct".to_string())),
                Err(e) => Err(bad(json, e.to_string())),
            }
        })
        .collect()
}

/// iceberg-rust's fast append. Its commit reloads and re-applies on conflicts; the guard makes
/// every reload refuse a table whose history already holds the job.
async fn append(
    catalog: &dyn Catalog,
    table: Table,
    job: &JobId,
    files: Vec<DataFile>,
    summary: HashMap<String, String>,
) -> Result<CommitOutcome> {
    let ident = table.identifier().clone();
    let committed_files = files.iter().map(|f| f.file_path().to_string()).collect();
    let guard =
        JobGuardCatalog::new(catalog, ident.clone(), job.clone()).with_summary(summary.clone());
    let mut table = table;
    let mut attempt = 0;
    loop {
        let tx = Transaction::new(&table);
        let tx = tx
            .fast_append()
            .add_data_files(files.clone())
            .set_snapshot_properties(summary.clone())
            .apply(tx)?;
        let e = match tx.commit(&guard).await {
            Ok(table) => {
                return Ok(CommitOutcome {
                    snapshot_id: job_snapshot_after_commit(&table, job)?,
                    already_committed: false,
                    committed_files,
                });
            }
            Err(e) => e,
        };
        // The guard stopped a retry (another coordinator committed the job), or the
        // commit failed in a way that may still have landed: the history answers.
        let Ok(reloaded) = catalog.load_table(&ident).await else {
            return Err(e.into());
        };
        if let Some(outcome) = landed(&reloaded, job, &committed_files).await? {
            if !outcome.already_committed {
                warn!(error = %e, "the commit reported an error but landed");
            }
            return Ok(outcome);
        }
        // Many writers appending to one table at once (a backfill's days, parallel
        // pipelines) can outlast iceberg-rust's retries: append again on the table as it
        // is now, after a pause of our own.
        attempt += 1;
        if e.kind() != iceberg::ErrorKind::CatalogCommitConflicts || attempt >= MAX_SWAP_ATTEMPTS {
            return Err(e.into());
        }
        info!(attempt, error = %e, "append kept conflicting with other commits; retrying");
        tokio::time::sleep(conflict_pause(attempt, random_unit())).await;
        table = reloaded;
    }
}

/// The job's snapshot, if the table has one, with the files it really holds; it counts as
/// this commit's own when it holds exactly `ours` (data file names are unique per attempt).
async fn landed(
    table: &Table,
    job: &JobId,
    ours: &HashSet<String>,
) -> Result<Option<CommitOutcome>> {
    let mut outcome = committed_before(table, job).await?;
    if let Some(outcome) = &mut outcome {
        outcome.already_committed = outcome.committed_files != *ours;
    }
    Ok(outcome)
}

/// Our own overwrite snapshot, swapped in the catalog; on a conflict or an unknown outcome
/// the table is reloaded, the history checked for the job, and the snapshot built again.
/// Manifests written for an attempt that did not land are deleted: at once after a
/// conflict or a refusal, and after the loop for an unknown outcome, once the reloaded table
/// shows they are not referenced.
/// Where an overwrite goes and what it replaces.
struct OverwriteTarget<'a> {
    config: &'a CatalogConfig,
    ident: &'a TableIdent,
    /// The partition spec the added files were written with.
    spec_id: i32,
    replace: Replace<'a>,
    /// The snapshot the new content was computed from, when it must land on exactly that
    /// one (a merge): a commit by another job in between fails this one.
    base: Option<Option<i64>>,
    /// A schema to add in the same swap (see [`crate::table::evolution`]).
    schema_change: Option<&'a SchemaChange>,
    /// For a rewrite of files read at this snapshot: a commit since then that added delete
    /// files fails it (they may delete rows of the files being rewritten, and would not
    /// apply to the rewritten ones).
    no_deletes_since: Option<i64>,
}

impl<'a> OverwriteTarget<'a> {
    /// A rewrite or a drop of files read at snapshot `read_at` (compaction, retention):
    /// appends since are kept; a rewrite also fails on delete files added since.
    fn file_change(
        (config, ident): (&'a CatalogConfig, &'a TableIdent),
        spec_id: i32,
        replace: Replace<'a>,
        read_at: i64,
    ) -> Self {
        OverwriteTarget {
            config,
            ident,
            spec_id,
            replace,
            base: None,
            schema_change: None,
            no_deletes_since: matches!(replace, Replace::Files(_)).then_some(read_at),
        }
    }
}

async fn overwrite(
    catalog: &dyn Catalog,
    target: &OverwriteTarget<'_>,
    job: &JobId,
    files: Vec<DataFile>,
    summary: HashMap<String, String>,
) -> Result<CommitOutcome> {
    let OverwriteTarget {
        config,
        ident,
        spec_id,
        replace,
        base,
        schema_change,
        no_deletes_since,
    } = *target;
    let committed_files: HashSet<String> =
        files.iter().map(|f| f.file_path().to_string()).collect();
    let mut last_error = String::new();
    let mut unknown: Vec<String> = Vec::new();
    let mut outcome = None;
    for attempt in 1..=MAX_SWAP_ATTEMPTS {
        let table = catalog.load_table(ident).await?;
        // Committed by another coordinator, or by our own swap whose answer was lost.
        if let Some(landed) = landed(&table, job, &committed_files).await? {
            outcome = Some(Ok(landed));
            break;
        }
        if let Err(e) = refuse_if_overtaken(&table, &summary) {
            outcome = Some(Err(e));
            break;
        }
        if let Some(base) = base
            && table.metadata().current_snapshot_id() != base
        {
            outcome = Some(Err(CoreError::Task {
                message: format!(
                    "{ident} changed while the merge ran (it read snapshot {}, the table is now at {}): the merge would lose that commit's rows; run the job again",
                    base.map_or("none".to_string(), |b| b.to_string()),
                    table
                        .metadata()
                        .current_snapshot_id()
                        .map_or("none".to_string(), |b| b.to_string())
                ),
                retryable: true,
            }));
            break;
        }
        if let Some(read_at) = no_deletes_since
            && let Some(snapshot) = deletes_added_since(&table, read_at)
        {
            outcome = Some(Err(CoreError::Task {
                message: format!(
                    "{ident}: snapshot {snapshot} added delete files while the rewrite ran; run it again"
                ),
                retryable: true,
            }));
            break;
        }
        let (mut updates, mut requirements) =
            match schema_change.map(|c| schema_updates(table.metadata(), c)) {
                Some(Err(message)) => {
                    outcome = Some(Err(CoreError::Task {
                        message: format!("{ident}: {message}"),
                        retryable: true,
                    }));
                    break;
                }
                Some(Ok(step)) => step.unwrap_or_default(),
                None => Default::default(),
            };
        // The snapshot is built on the table as it will be once the schema lands.
        let evolved = if updates.is_empty() {
            table.clone()
        } else {
            with_updates_applied(&table, &updates)?
        };
        let produced =
            produce_overwrite(&evolved, files.clone(), spec_id, replace, summary.clone()).await?;
        updates.extend(produced.updates);
        requirements.extend(produced.requirements);
        match swap_table_metadata(config, &table, updates, requirements).await {
            Ok(()) => {
                outcome = Some(Ok(CommitOutcome {
                    snapshot_id: produced.snapshot_id,
                    already_committed: false,
                    committed_files: committed_files.clone(),
                }));
                break;
            }
            Err(SwapError::Conflict(message)) => {
                info!(attempt, %message, "overwrite conflicted with another commit; retrying");
                crate::metrics::commit_conflict();
                delete_written(&table, &produced.written).await;
                last_error = message;
            }
            Err(SwapError::Unknown(message)) => {
                warn!(attempt, %message, "overwrite outcome unknown; checking the table");
                unknown.extend(produced.written);
                last_error = message;
            }
            Err(SwapError::Failed(e)) => {
                delete_written(&table, &produced.written).await;
                outcome = Some(Err(e));
                break;
            }
        }
        tokio::time::sleep(conflict_pause(attempt, random_unit())).await;
    }
    if !unknown.is_empty()
        && let Ok(table) = catalog.load_table(ident).await
    {
        match TableReferences::load(&table).await {
            Ok(references) => {
                let unreferenced: Vec<String> = unknown
                    .into_iter()
                    .filter(|path| !references.references(path))
                    .collect();
                delete_written(&table, &unreferenced).await;
            }
            Err(e) => {
                warn!(error = %e, "cannot read the table's references; manifests of unknown swaps stay")
            }
        }
    }
    outcome.unwrap_or_else(|| {
        Err(CoreError::Target {
            table: ident.to_string(),
            message: format!(
                "overwrite did not land after {MAX_SWAP_ATTEMPTS} attempts: {last_error}"
            ),
        })
    })
}

/// Commits a change of files that is no job's result, tagged with `job`: a compaction
/// ([`Replace::Files`]: the replaced files leave and `files`, holding the same rows, come in;
/// a `replace` snapshot) or a partition drop ([`Replace::Drop`], nothing added; a `delete`
/// snapshot). Appends committed meanwhile are kept (each attempt builds on the reloaded
/// table); a commit since `read_at` that removed one of the files fails it, and for a
/// compaction so does one that added delete files.
pub async fn commit_file_change(
    catalog: &dyn Catalog,
    config: &CatalogConfig,
    ident: &TableIdent,
    job: &JobId,
    (files_json, written_with): (&[String], WrittenWith),
    (replace, read_at): (Replace<'_>, i64),
    mut summary: HashMap<String, String>,
) -> Result<CommitOutcome> {
    let table = catalog.load_table(ident).await?;
    let files = decode_data_files(&written_layout(&table, written_with, None)?, files_json)?;
    summary.insert(JOB_ID_PROPERTY.to_string(), job.to_string());
    let target = OverwriteTarget::file_change(
        (config, ident),
        written_with.partition_spec_id,
        replace,
        read_at,
    );
    overwrite(catalog, &target, job, files, summary).await
}

/// The oldest snapshot after `read_at` in the table's current history that added delete
/// files, if any.
fn deletes_added_since(table: &Table, read_at: i64) -> Option<i64> {
    current_history(table)
        .iter()
        .take_while(|s| s.snapshot_id() != read_at)
        .filter(|s| {
            s.summary()
                .additional_properties
                .get("added-delete-files")
                .is_some_and(|n| n != "0")
        })
        .map(|s| s.snapshot_id())
        .last()
}

/// Deletes manifests and manifest lists of a snapshot that did not land (never referenced:
/// the catalog refused the swap that would have referenced them).
async fn delete_written(table: &Table, written: &[String]) {
    for path in written {
        if let Err(e) = table.file_io().delete(path).await {
            warn!(path, error = %e, "cannot delete a manifest of an overwrite that did not land");
        }
    }
}

fn job_snapshot_after_commit(table: &Table, job: &JobId) -> Result<i64> {
    find_job_snapshot(table, job).ok_or_else(|| CoreError::Target {
        table: table.identifier().to_string(),
        message: "commit succeeded but the new snapshot is not in the table history".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_that_conflicted_together_pause_apart_within_a_doubling_ceiling() {
        assert_eq!(conflict_pause(1, 0.5), Duration::from_millis(100));
        assert_eq!(conflict_pause(3, 0.999_999).as_millis(), 799);
        // The ceiling stops doubling at 6.4 s; a pause is never shorter than 10 ms.
        assert_eq!(conflict_pause(20, 1.0), Duration::from_millis(6400));
        assert_eq!(conflict_pause(2, 0.0), Duration::from_millis(10));
        // Two writers with different draws pause differently.
        assert_ne!(conflict_pause(4, 0.2), conflict_pause(4, 0.7));
        let unit = random_unit();
        assert!((0.0..1.0).contains(&unit), "{unit}");
    }

    #[test]
    fn a_rewrite_refuses_deletes_added_since_its_read_and_a_drop_does_not() {
        let config = CatalogConfig::Rest {
            name: "c".into(),
            uri: "http://127.0.0.1:1".into(),
            warehouse: "w".into(),
            credential: None,
        };
        let ident = TableIdent::from_strs(["ns", "t"]).unwrap();
        let files: HashSet<String> = ["s3://b/t/data/a.parquet".to_string()].into();
        let rewrite =
            OverwriteTarget::file_change((&config, &ident), 3, Replace::Files(&files), 42);
        assert_eq!(rewrite.no_deletes_since, Some(42));
        assert_eq!(rewrite.base, None, "appends since the read are kept");
        assert_eq!(rewrite.spec_id, 3);
        let drop = OverwriteTarget::file_change((&config, &ident), 3, Replace::Drop(&files), 42);
        assert_eq!(drop.no_deletes_since, None);
        assert_eq!(drop.base, None);
    }
}
