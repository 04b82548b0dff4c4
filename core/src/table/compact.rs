//! Compaction: a partition's small data files rewritten into files near the table's target
//! size, committed as one `replace` snapshot (the rows do not change).
//!
//! Each partition (of the table's current partition spec) whose small files number at least
//! `min_input_files` is one group. The group's files are read with iceberg-rust's reader (so
//! columns are matched by field id across schema changes) and written by the same writer as
//! a job's final stage, under names no job's cleanup parses as its own
//! ([`crate::names::compaction_file_prefix`]). The commit rebuilds on the reloaded table at
//! each attempt, so appends committed meanwhile are kept; a commit that removed a file being
//! rewritten, or added delete files, fails the compaction and its written files are deleted.
//! Files that delete files apply to are left alone.
//!
//! Why it never deletes a committed file: the files it replaces leave the *snapshot* only
//! (older snapshots keep them until expiry, which asks `TableReferences`); the only files it
//! deletes from storage are the ones it wrote itself, after a failed commit, and only those
//! no snapshot of the reloaded table references (`delete_unreferenced`).

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::StreamExt;
use iceberg::scan::FileScanTask;
use iceberg::spec::ManifestContentType;
use iceberg::table::Table;
use iceberg::{Catalog, TableIdent};
use tracing::{info, warn};

use super::catalog::CatalogConfig;
use super::commit::{WrittenWith, commit_file_change};
use super::live::{live_entries, scan_tasks};
use super::overwrite::Replace;
use super::references::TableReferences;
use super::writer::{WriteLayout, data_file_paths, table_output, write_batches};
use crate::error::{CoreError, Result};
use crate::ids::JobId;

/// The table property naming the data file size writers aim for.
pub const TARGET_FILE_SIZE_PROPERTY: &str = "write.target-file-size-bytes";
/// The target size when the table names none (as a job's writer).
pub const DEFAULT_TARGET_FILE_BYTES: u64 = 512 << 20;

/// Which files compaction rewrites.
#[derive(Debug, Clone, Copy)]
pub struct CompactPolicy {
    /// The size written files aim for; a file under three quarters of it is small. `None`:
    /// the table's `write.target-file-size-bytes`, else 512 MiB.
    pub target_file_bytes: Option<u64>,
    /// A partition is rewritten when it has at least this many small files (at least 2).
    pub min_input_files: usize,
}

/// A live data file, as the grouping sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub path: String,
    pub bytes: u64,
    /// The partition spec it was written with, and its partition value in words.
    pub spec_id: i32,
    pub partition: String,
    /// Delete files apply to it.
    pub has_deletes: bool,
}

/// The groups to rewrite: per partition of `current_spec`, the small files without delete
/// files, when there are at least `min_input_files` of them. Paths sorted within a group,
/// groups by partition.
pub fn plan_groups(
    files: &[Candidate],
    current_spec: i32,
    target_file_bytes: u64,
    min_input_files: usize,
) -> Vec<Vec<&Candidate>> {
    let small = target_file_bytes.saturating_mul(3) / 4;
    let mut by_partition: BTreeMap<&str, Vec<&Candidate>> = BTreeMap::new();
    for file in files {
        if file.spec_id == current_spec && !file.has_deletes && file.bytes < small {
            by_partition.entry(&file.partition).or_default().push(file);
        }
    }
    by_partition
        .into_values()
        .filter(|group| group.len() >= min_input_files.max(2))
        .map(|mut group| {
            group.sort_by(|a, b| a.path.cmp(&b.path));
            group
        })
        .collect()
}

/// What a compaction did (or, with `dry_run`, would do).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Compacted {
    /// Partitions rewritten.
    pub partitions: usize,
    pub files_rewritten: usize,
    pub bytes_rewritten: u64,
    pub files_written: usize,
    /// Small files left alone because delete files apply to them.
    pub skipped_with_deletes: usize,
    /// The `replace` snapshot (none when nothing was rewritten, or on a dry run).
    pub snapshot_id: Option<i64>,
}

/// What a compaction of a table's current snapshot rewrites.
#[derive(Debug, Default)]
pub struct CompactionPlan {
    /// The snapshot the files were chosen from (none: the table has no snapshot).
    pub read_at: Option<i64>,
    /// The size written files aim for.
    pub target_file_bytes: u64,
    /// The scan tasks of the files to rewrite, one group per partition.
    pub groups: Vec<Vec<FileScanTask>>,
    /// The counts so far (nothing written yet).
    pub report: Compacted,
}

impl CompactionPlan {
    /// The paths of the files to rewrite.
    pub fn replaced(&self) -> HashSet<String> {
        self.groups
            .iter()
            .flatten()
            .map(|t| t.data_file_path().to_string())
            .collect()
    }

    /// The rows the files to rewrite hold, by their manifests: what the rewrite must write.
    pub fn rows(&self) -> u64 {
        self.groups
            .iter()
            .flatten()
            .filter_map(|t| t.record_count)
            .sum()
    }
}

/// Chooses the files of the table's current snapshot that `policy` rewrites.
pub async fn plan_compaction(table: &Table, policy: CompactPolicy) -> Result<CompactionPlan> {
    let target = policy.target_file_bytes.unwrap_or_else(|| {
        table
            .metadata()
            .properties()
            .get(TARGET_FILE_SIZE_PROPERTY)
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_TARGET_FILE_BYTES)
    });
    let Some(read_at) = table.metadata().current_snapshot_id() else {
        return Ok(CompactionPlan {
            target_file_bytes: target,
            ..Default::default()
        });
    };
    let tasks = scan_tasks(table, read_at).await?;
    let specs = spec_of_live_files(table, read_at).await?;
    let candidates: Vec<Candidate> = tasks.iter().map(|t| candidate(t, &specs)).collect();
    let current_spec = table.metadata().default_partition_spec_id();
    let groups = plan_groups(&candidates, current_spec, target, policy.min_input_files);
    let small = target.saturating_mul(3) / 4;
    let report = Compacted {
        partitions: groups.len(),
        files_rewritten: groups.iter().map(Vec::len).sum(),
        bytes_rewritten: groups.iter().flatten().map(|c| c.bytes).sum(),
        skipped_with_deletes: candidates
            .iter()
            .filter(|c| c.has_deletes && c.bytes < small)
            .count(),
        ..Default::default()
    };
    let groups = groups
        .iter()
        .map(|group| {
            let paths: HashSet<&str> = group.iter().map(|c| c.path.as_str()).collect();
            tasks
                .iter()
                .filter(|t| paths.contains(t.data_file_path()))
                .cloned()
                .collect()
        })
        .collect();
    Ok(CompactionPlan {
        read_at: Some(read_at),
        target_file_bytes: target,
        groups,
        report,
    })
}

/// The table's partitioning as a spec's `partition_by` entries (`day(ts)`, `bucket(16, id)`),
/// for a compaction job that writes the table as it is partitioned.
pub fn partition_by_entries(
    spec: &iceberg::spec::PartitionSpec,
    schema: &iceberg::spec::Schema,
) -> Result<Vec<String>> {
    use iceberg::spec::Transform;
    spec.fields()
        .iter()
        .map(|field| {
            let column = schema
                .field_by_id(field.source_id)
                .map(|f| f.name.clone())
                .ok_or_else(|| {
                    CoreError::Protocol(format!(
                        "partition field `{}` reads column id {}, which the current schema lacks",
                        field.name, field.source_id
                    ))
                })?;
            Ok(match field.transform {
                Transform::Identity => format!("identity({column})"),
                Transform::Year => format!("year({column})"),
                Transform::Month => format!("month({column})"),
                Transform::Day => format!("day({column})"),
                Transform::Hour => format!("hour({column})"),
                Transform::Bucket(n) => format!("bucket({n}, {column})"),
                Transform::Truncate(w) => format!("truncate({w}, {column})"),
                other => {
                    return Err(CoreError::Protocol(format!(
                        "partition field `{}` uses the {other} transform, which a job cannot write",
                        field.name
                    )));
                }
            })
        })
        .collect()
}

/// Rewrites the table's small files per `policy` as one `replace` snapshot, in this process.
pub async fn compact(
    catalog: &dyn Catalog,
    config: &CatalogConfig,
    ident: &TableIdent,
    policy: CompactPolicy,
    dry_run: bool,
) -> Result<Compacted> {
    let table = catalog.load_table(ident).await?;
    let plan = plan_compaction(&table, policy).await?;
    let mut done = plan.report.clone();
    let (Some(read_at), false) = (plan.read_at, plan.groups.is_empty() || dry_run) else {
        return Ok(done);
    };
    let target = plan.target_file_bytes;
    let groups = &plan.groups;
    let job = JobId::parse(&crate::names::compaction_file_prefix())
        .map_err(|e| CoreError::Protocol(format!("compaction id: {e}")))?;
    let mut out = table_output(&table, None, Vec::new())?;
    out.target_file_size_bytes = target;
    // Each file's footer lists the jobs whose rows its partition's input files held, so a
    // backfill value's overwrite still knows another value's rows once they are compacted.
    out.parquet_properties.insert(
        super::provenance::ROWS_OF_JOBS_BY_PARTITION.to_string(),
        super::provenance::footers_of_groups(groups).await?,
    );
    let mut written: Vec<String> = Vec::new();
    let replaced = plan.replaced();
    let rewrite = async {
        for (n, group_tasks) in groups.iter().enumerate() {
            let group_tasks = group_tasks.clone();
            let files = group_tasks.len();
            let expected: u64 = group_tasks.iter().filter_map(|t| t.record_count).sum();
            let stream = futures::stream::iter(group_tasks.into_iter().map(Ok)).boxed();
            let batches = table.reader_builder().build().read(stream)?.stream();
            let summary = write_batches(
                batches,
                &out,
                format!("{job}-g{n}"),
                WriteLayout::unbounded(),
            )
            .await?;
            written.extend(summary.data_files_json);
            // Compaction must not change rows: never commit a rewrite that lost or gained any.
            if summary.rows != expected {
                return Err(CoreError::Target {
                    table: ident.to_string(),
                    message: format!(
                        "compaction read {} rows from {} files whose manifests say {expected}; nothing committed",
                        summary.rows, files
                    ),
                });
            }
        }
        // Tests hold the compaction here while another job appends.
        fail::fail_point!("compact-before-commit");
        let mut summary = std::collections::HashMap::new();
        summary.insert(
            super::commit::MAINTENANCE_PROPERTY.to_string(),
            "compact".to_string(),
        );
        commit_file_change(
            catalog,
            config,
            ident,
            &job,
            (&written, WrittenWith::current(&table)),
            (Replace::Files(&replaced), read_at),
            summary,
        )
        .await
    };
    match rewrite.await {
        Ok(outcome) => {
            done.files_written = written.len();
            done.snapshot_id = Some(outcome.snapshot_id);
            info!(
                partitions = done.partitions,
                files = done.files_rewritten,
                into = done.files_written,
                snapshot_id = outcome.snapshot_id,
                "compacted"
            );
            Ok(done)
        }
        Err(e) => {
            delete_unreferenced(catalog, ident, &data_file_paths(&written)).await;
            Err(e)
        }
    }
}

/// The partition spec of each live data file of `snapshot_id`, from its manifests (the scan's
/// tasks do not carry it).
async fn spec_of_live_files(table: &Table, snapshot_id: i64) -> Result<HashMap<String, i32>> {
    let Some(snapshot) = table.metadata().snapshot_by_id(snapshot_id) else {
        return Ok(HashMap::new());
    };
    Ok(live_entries(table, snapshot)
        .await?
        .into_iter()
        .filter(|live| live.content == ManifestContentType::Data)
        .map(|live| (live.entry.file_path().to_string(), live.spec_id))
        .collect())
}

fn candidate(task: &FileScanTask, specs: &HashMap<String, i32>) -> Candidate {
    Candidate {
        path: task.data_file_path().to_string(),
        bytes: task.file_size_in_bytes,
        spec_id: specs.get(task.data_file_path()).copied().unwrap_or(-1),
        partition: task
            .partition
            .as_ref()
            .map_or_else(String::new, |p| format!("{p:?}")),
        has_deletes: !task.deletes.is_empty(),
    }
}

/// Deletes the files a failed compaction wrote, except any a snapshot references (a commit
/// whose answer was lost may have landed after all).
async fn delete_unreferenced(catalog: &dyn Catalog, ident: &TableIdent, paths: &[String]) {
    let Ok(table) = catalog.load_table(ident).await else {
        warn!("cannot reload the table; the compaction's files stay for orphan removal");
        return;
    };
    let references = match TableReferences::load(&table).await {
        Ok(references) => references,
        Err(e) => {
            warn!(error = %e, "cannot read the table's references; the compaction's files stay for orphan removal");
            return;
        }
    };
    for path in paths.iter().filter(|p| !references.references(p)) {
        if let Err(e) = table.file_io().delete(path).await {
            warn!(path, error = %e, "cannot delete a file of a failed compaction");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitioning_reads_back_as_partition_by_entries() {
        use iceberg::spec::{NestedField, PartitionSpec, PrimitiveType, Schema, Transform, Type};
        let schema = Schema::builder()
            .with_fields(vec![
                NestedField::required(1, "ts", Type::Primitive(PrimitiveType::Timestamp)).into(),
                NestedField::optional(2, "id", Type::Primitive(PrimitiveType::Long)).into(),
                NestedField::optional(3, "région", Type::Primitive(PrimitiveType::String)).into(),
            ])
            .build()
            .unwrap();
        let spec = PartitionSpec::builder(schema.clone())
            .add_partition_field("ts", "ts_day", Transform::Day)
            .unwrap()
            .add_partition_field("id", "id_bucket", Transform::Bucket(16))
            .unwrap()
            .add_partition_field("région", "région", Transform::Identity)
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(
            partition_by_entries(&spec, &schema).unwrap(),
            ["day(ts)", "bucket(16, id)", "identity(région)"]
        );
        let unpartitioned = PartitionSpec::builder(schema.clone()).build().unwrap();
        assert!(
            partition_by_entries(&unpartitioned, &schema)
                .unwrap()
                .is_empty()
        );
    }

    fn file(path: &str, bytes: u64, partition: &str) -> Candidate {
        Candidate {
            path: path.into(),
            bytes,
            spec_id: 0,
            partition: partition.into(),
            has_deletes: false,
        }
    }

    fn paths(groups: Vec<Vec<&Candidate>>) -> Vec<Vec<&str>> {
        groups
            .into_iter()
            .map(|g| g.into_iter().map(|c| c.path.as_str()).collect())
            .collect()
    }

    #[test]
    fn small_files_group_by_partition_when_there_are_enough() {
        let files = [
            file("d/b", 10, "day=2"),
            file("d/a", 10, "day=2"),
            file("d/big", 80, "day=2"), // three quarters of 100 or more: not small
            file("d/c", 10, "day=1"),   // alone in its partition
            file("d/e", 74, "day=3"),
            file("d/f", 1, "day=3"),
        ];
        assert_eq!(
            paths(plan_groups(&files, 0, 100, 2)),
            [vec!["d/a", "d/b"], vec!["d/e", "d/f"]]
        );
        assert_eq!(
            paths(plan_groups(&files, 0, 100, 3)),
            Vec::<Vec<&str>>::new()
        );
        // A minimum below 2 would rewrite a file into itself.
        assert_eq!(paths(plan_groups(&files, 0, 100, 1)).len(), 2);
    }

    #[test]
    fn files_of_an_older_spec_or_with_deletes_are_left_alone() {
        let mut old_spec = file("d/old", 10, "day=2");
        old_spec.spec_id = 1;
        let mut deleted = file("d/del", 10, "day=2");
        deleted.has_deletes = true;
        let files = [old_spec, deleted, file("d/a", 10, "day=2")];
        assert!(plan_groups(&files, 0, 100, 2).is_empty());
    }
}
