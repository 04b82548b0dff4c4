//! An overwrite snapshot: the job's data files become the table's whole content.
//!
//! iceberg-rust 0.10 has no overwrite action, so this builds the snapshot from its public
//! pieces the way Java's `OverwriteFiles` does: one manifest adding the new files, one
//! manifest per partition spec and content marking every live file of the current snapshot
//! `DELETED` (so incremental readers and `deleted-*` summaries see what went), a manifest
//! list over both, and the `AddSnapshot` + `SetSnapshotRef(main)` updates with the
//! requirements "same table, `main` still at the snapshot we read". Files are removed from
//! the snapshot, not from storage: older snapshots still reference them until they expire.
//!
//! [`Replace::PartitionsOf`] replaces only the partitions the added files fall in (dynamic
//! partition overwrite, as Spark's `INSERT OVERWRITE` with `partitionOverwriteMode=dynamic`):
//! manifests with no replaced file are listed again as they are; manifests with some are
//! rewritten, their replaced files `DELETED` and the others `EXISTING` with their original
//! snapshot and sequence numbers.

use std::collections::{BTreeMap, HashMap, HashSet};

use iceberg::spec::{
    DataContentType, DataFile, FormatVersion, MAIN_BRANCH, ManifestContentType, ManifestFile,
    ManifestListWriter, ManifestWriter, ManifestWriterBuilder, Operation, Snapshot,
    SnapshotReference, SnapshotRetention, SnapshotSummaryCollector, Struct, Summary,
};
use iceberg::table::Table;
use iceberg::{TableRequirement, TableUpdate};
use uuid::Uuid;

use crate::error::Result;
use crate::names;

/// A snapshot written to storage but not yet in the catalog.
#[derive(Debug)]
pub struct ProducedSnapshot {
    pub snapshot_id: i64,
    pub updates: Vec<TableUpdate>,
    pub requirements: Vec<TableRequirement>,
    /// Manifest and manifest-list files written for it: garbage if the swap does not land.
    pub written: Vec<String>,
}

/// A live file of the current snapshot, with the numbers a `DELETED` or `EXISTING` entry
/// keeps.
struct LiveFile {
    data_file: DataFile,
    snapshot_id: i64,
    sequence_number: i64,
    file_sequence_number: Option<i64>,
}

/// Which live files of the current snapshot the new snapshot replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace<'a> {
    /// Every one: the added files become the table's whole content.
    All,
    /// Those in a partition (of the added files' spec) that an added file falls in, or that
    /// is one of these (the partitions of rows a check set aside, replaced as if they had
    /// had files).
    PartitionsOf(&'a [Struct]),
    /// None: the snapshot appends (for an append that also changes the schema).
    Nothing,
    /// These data files (by path), rewritten into the added ones with the same rows: a
    /// `replace` snapshot (compaction).
    Files(&'a HashSet<String>),
    /// These files (by path, data and delete files), removed with their rows and nothing
    /// added: a `delete` snapshot (partition retention).
    Drop(&'a HashSet<String>),
    /// These data files (by path), whose rows the added files replace with changed ones: an
    /// `overwrite` snapshot, or an `append` when none is listed (a merge that only inserts).
    /// Like every variant, they leave the snapshot, not storage.
    Rows(&'a HashSet<String>),
}

/// What becomes of the current snapshot's live files.
#[derive(Default)]
struct Carried {
    /// Manifests none of whose live files is replaced: listed again as they are.
    kept_manifests: Vec<ManifestFile>,
    /// Replaced files, by (partition spec, holds deletes).
    removed: BTreeMap<(i32, bool), Vec<LiveFile>>,
    /// Files kept from manifests that are rewritten.
    existing: BTreeMap<(i32, bool), Vec<LiveFile>>,
    /// Every live file after the commit except the added ones (for the summary's totals).
    remaining: Vec<DataFile>,
}

/// Builds the snapshot that replaces `table`'s rows (all of them, or those of the partitions
/// `added` falls in) with `added`, which were written with partition spec `added_spec_id`.
/// With [`Replace::All`] and nothing added the table is emptied. `properties` go into the
/// snapshot summary.
pub async fn produce_overwrite(
    table: &Table,
    added: Vec<DataFile>,
    added_spec_id: i32,
    replace: Replace<'_>,
    properties: HashMap<String, String>,
) -> Result<ProducedSnapshot> {
    let producer = Producer::new(table);
    let also_replaced: &[Struct] = match replace {
        Replace::PartitionsOf(also) => also,
        _ => &[],
    };
    let partitions: HashSet<Struct> = added
        .iter()
        .map(|f| f.partition())
        .chain(also_replaced)
        .map(widened_partition)
        .collect();
    let added_spec = table
        .metadata()
        .partition_spec_by_id(added_spec_id)
        .cloned();
    // A file of an earlier spec that may hold rows of a replaced partition (the first met).
    let earlier_spec_file: std::sync::Mutex<Option<(String, i32)>> = Default::default();
    let replaced = |spec_id: i32, file: &DataFile| match replace {
        Replace::All => true,
        Replace::PartitionsOf(_) if spec_id != added_spec_id => {
            let mut met = earlier_spec_file.lock().expect("earlier spec file lock");
            if met.is_none()
                && added_spec.as_ref().is_none_or(|spec| {
                    super::earlier_specs::may_hold_rows_of(file, spec, &partitions)
                })
            {
                *met = Some((file.file_path().to_string(), spec_id));
            }
            false
        }
        Replace::PartitionsOf(_) => partitions.contains(&widened_partition(file.partition())),
        Replace::Nothing => false,
        Replace::Files(paths) | Replace::Drop(paths) | Replace::Rows(paths) => {
            paths.contains(file.file_path())
        }
    };
    let carried = producer.carry(replaced).await?;
    if let Replace::PartitionsOf(_) = replace {
        let met = earlier_spec_file
            .lock()
            .expect("earlier spec file lock")
            .take();
        if let Some((file, spec_id)) = met {
            let (Some(file_spec), Some(spec)) = (
                table.metadata().partition_spec_by_id(spec_id),
                added_spec.as_ref(),
            ) else {
                return Err(crate::error::CoreError::Target {
                    table: table.identifier().to_string(),
                    message: format!(
                        "partition spec {spec_id} or {added_spec_id} is not in the table"
                    ),
                });
            };
            return Err(crate::error::CoreError::Target {
                table: table.identifier().to_string(),
                message: super::earlier_specs::refusal(&file, file_spec, spec),
            });
        }
        refuse_replacing_another_backfill_value(table, &carried, &properties).await?;
    }
    if let Replace::Files(paths) | Replace::Drop(paths) | Replace::Rows(paths) = replace {
        let found = carried.removed.values().map(Vec::len).sum::<usize>();
        if found != paths.len() {
            return Err(crate::error::CoreError::Target {
                table: table.identifier().to_string(),
                message: format!(
                    "{} of the {} files being rewritten or dropped are no longer in the table (another commit removed them)",
                    paths.len() - found,
                    paths.len()
                ),
            });
        }
    }
    let operation = match replace {
        Replace::Files(_) => Some(Operation::Replace),
        Replace::Drop(_) => Some(Operation::Delete),
        _ => None,
    };
    producer
        .produce(added, added_spec_id, carried, (properties, operation))
        .await
}

/// Fails when a partition overwrite by a backfill value would remove rows another value of
/// the backfill committed ([`super::backfill_values`]): the first such file's commit is named.
/// A file whose commit expired is judged by the job its name carries, a compaction's file by
/// the jobs its footer lists ([`super::provenance`]).
async fn refuse_replacing_another_backfill_value(
    table: &Table,
    carried: &Carried,
    ours: &HashMap<String, String>,
) -> Result<()> {
    use super::backfill_values::{replaces_another_value, replaces_another_values_file};
    use super::provenance::{Judged, jobs_in_footer, judged_by, writer_of};
    if !super::backfill_values::is_backfill_value(ours) {
        return Ok(());
    }
    let metadata = table.metadata();
    let mut other = None;
    for file in carried.removed.values().flatten() {
        let path = file.data_file.file_path();
        let theirs = metadata.snapshot_by_id(file.snapshot_id);
        other = match judged_by(writer_of(path), theirs.is_some()) {
            Judged::ByFooter => jobs_in_footer(path)
                .await?
                .unwrap_or_default()
                .iter()
                .find_map(|job| replaces_another_values_file(ours, job)),
            Judged::BySnapshot => theirs.and_then(|theirs| {
                replaces_another_value(ours, &theirs.summary().additional_properties)
            }),
            Judged::ByName(job) => replaces_another_values_file(ours, &job),
            Judged::Not => None,
        };
        if other.is_some() {
            break;
        }
    }
    match other {
        Some(other) => Err(crate::error::CoreError::Target {
            table: table.identifier().to_string(),
            message: super::backfill_values::refusal(&other),
        }),
        None => Ok(()),
    }
}

/// `partition` with its `int` values as `long` and `float` values as `double` (exactly),
/// the form in which a partition written before its source column was widened
/// (`add_columns`: int to long, float to double) equals the same value written after. The
/// manifest keeps the type a file was written with, so partition `n = 5` written as an int
/// never equalled `n = 5` as a long, and an `overwrite_partitions` kept the old rows beside
/// the new ones.
fn widened_partition(partition: &Struct) -> Struct {
    use iceberg::spec::{Literal, PrimitiveLiteral};
    partition
        .iter()
        .map(|value| {
            value.map(|literal| match literal {
                Literal::Primitive(PrimitiveLiteral::Int(v)) => Literal::long(i64::from(*v)),
                Literal::Primitive(PrimitiveLiteral::Float(v)) => Literal::double(f64::from(v.0)),
                other => other.clone(),
            })
        })
        .collect()
}

/// The newest of the table's schemas under which `file`'s partition values have the types
/// the spec gives them. A file written before its partition column was widened keeps its
/// narrow values (an `int` under what is now a `long`), which iceberg-rust cannot print
/// under the current schema (it panics naming the partition in the snapshot summary).
fn schema_of_partition(
    table: &Table,
    spec: &iceberg::spec::PartitionSpec,
    file: &DataFile,
) -> Option<iceberg::spec::SchemaRef> {
    use iceberg::spec::{Literal, PrimitiveLiteral, PrimitiveType, Type};
    let narrow_under_wide = |ty: &Type, value: Option<&Literal>| {
        matches!(
            (ty, value),
            (
                Type::Primitive(PrimitiveType::Long),
                Some(Literal::Primitive(PrimitiveLiteral::Int(_)))
            ) | (
                Type::Primitive(PrimitiveType::Double),
                Some(Literal::Primitive(PrimitiveLiteral::Float(_)))
            )
        )
    };
    let mut schemas: Vec<_> = table.metadata().schemas_iter().cloned().collect();
    schemas.sort_by_key(|s| std::cmp::Reverse(s.schema_id()));
    schemas.into_iter().find(|schema| {
        spec.partition_type(schema).is_ok_and(|ty| {
            ty.fields()
                .iter()
                .zip(file.partition().iter())
                .all(|(field, value)| !narrow_under_wide(&field.field_type, value))
        })
    })
}

struct Producer<'a> {
    table: &'a Table,
    snapshot_id: i64,
    commit_uuid: Uuid,
    sequence_number: i64,
}

impl<'a> Producer<'a> {
    fn new(table: &'a Table) -> Self {
        Producer {
            table,
            snapshot_id: unique_snapshot_id(table),
            commit_uuid: Uuid::now_v7(),
            sequence_number: table.metadata().next_sequence_number(),
        }
    }

    /// Sorts the current snapshot's live files into replaced and kept.
    async fn carry(&self, replaced: impl Fn(i32, &DataFile) -> bool) -> Result<Carried> {
        let mut carried = Carried::default();
        let Some(current) = self.table.metadata().current_snapshot() else {
            return Ok(carried);
        };
        let list = self.table.manifest_list_reader(current).load().await?;
        for manifest_file in list.entries() {
            let manifest = manifest_file.load_manifest(self.table.file_io()).await?;
            let spec_id = manifest_file.partition_spec_id;
            let key = (
                spec_id,
                manifest_file.content == ManifestContentType::Deletes,
            );
            let live: Vec<LiveFile> = manifest
                .entries()
                .iter()
                .filter(|e| e.is_alive())
                .map(|entry| {
                    let sequence_number = entry.sequence_number().unwrap_or(0);
                    LiveFile {
                        data_file: entry.data_file().clone(),
                        snapshot_id: entry.snapshot_id().unwrap_or(current.snapshot_id()),
                        sequence_number,
                        file_sequence_number: entry.file_sequence_number.or(Some(sequence_number)),
                    }
                })
                .collect();
            if live.is_empty() {
                continue; // every file in it was deleted by an earlier snapshot
            }
            if !live.iter().any(|f| replaced(spec_id, &f.data_file)) {
                carried
                    .remaining
                    .extend(live.into_iter().map(|f| f.data_file));
                carried.kept_manifests.push(manifest_file.clone());
                continue;
            }
            for file in live {
                if replaced(spec_id, &file.data_file) {
                    carried.removed.entry(key).or_default().push(file);
                } else {
                    carried.remaining.push(file.data_file.clone());
                    carried.existing.entry(key).or_default().push(file);
                }
            }
        }
        Ok(carried)
    }

    async fn produce(
        self,
        added: Vec<DataFile>,
        added_spec_id: i32,
        carried: Carried,
        (properties, operation): (HashMap<String, String>, Option<Operation>),
    ) -> Result<ProducedSnapshot> {
        let metadata = self.table.metadata();
        let mut summary = self.summary((&added, added_spec_id), &carried, properties);
        if let Some(operation) = operation {
            summary.operation = operation;
        }
        let mut written = Vec::new();
        let mut manifests: Vec<ManifestFile> = Vec::new();
        if !added.is_empty() {
            let mut writer =
                self.manifest_writer(added_spec_id, false, manifests.len(), &mut written)?;
            for file in added {
                writer.add_file(file, self.sequence_number)?;
            }
            manifests.push(writer.write_manifest_file().await?);
        }
        let Carried {
            kept_manifests,
            mut removed,
            mut existing,
            ..
        } = carried;
        let keys: std::collections::BTreeSet<(i32, bool)> =
            removed.keys().chain(existing.keys()).copied().collect();
        for key @ (spec_id, is_deletes) in keys {
            let mut writer =
                self.manifest_writer(spec_id, is_deletes, manifests.len(), &mut written)?;
            for file in removed.remove(&key).unwrap_or_default() {
                writer.add_delete_file(
                    file.data_file,
                    file.sequence_number,
                    file.file_sequence_number,
                )?;
            }
            for file in existing.remove(&key).unwrap_or_default() {
                writer.add_existing_file(
                    file.data_file,
                    file.snapshot_id,
                    file.sequence_number,
                    file.file_sequence_number,
                )?;
            }
            manifests.push(writer.write_manifest_file().await?);
        }
        manifests.extend(kept_manifests);

        let list_path =
            names::manifest_list_path(metadata.location(), self.snapshot_id, &self.commit_uuid);
        written.push(list_path.clone());
        let out = self
            .table
            .file_io()
            .new_output(&list_path)?
            .writer()
            .await?;
        let parent = metadata.current_snapshot_id();
        let first_row_id = metadata.next_row_id();
        let mut list = match metadata.format_version() {
            FormatVersion::V1 => ManifestListWriter::v1(out, self.snapshot_id, parent),
            FormatVersion::V2 => {
                ManifestListWriter::v2(out, self.snapshot_id, parent, self.sequence_number)
            }
            FormatVersion::V3 => ManifestListWriter::v3(
                out,
                self.snapshot_id,
                parent,
                self.sequence_number,
                Some(first_row_id),
            ),
        };
        list.add_manifests(manifests.into_iter())?;
        let next_row_id = list.next_row_id();
        list.close().await?;

        let snapshot = Snapshot::builder()
            .with_manifest_list(list_path)
            .with_snapshot_id(self.snapshot_id)
            .with_parent_snapshot_id(parent)
            .with_sequence_number(self.sequence_number)
            .with_summary(summary)
            .with_schema_id(metadata.current_schema_id())
            .with_timestamp_ms(now_ms());
        let snapshot = match next_row_id {
            Some(next) => snapshot
                .with_row_range(first_row_id, next - first_row_id)
                .build(),
            None => snapshot.build(),
        };
        Ok(ProducedSnapshot {
            snapshot_id: snapshot.snapshot_id(),
            updates: vec![
                TableUpdate::AddSnapshot { snapshot },
                TableUpdate::SetSnapshotRef {
                    ref_name: MAIN_BRANCH.to_string(),
                    reference: SnapshotReference::new(
                        self.snapshot_id,
                        SnapshotRetention::branch(None, None, None),
                    ),
                },
            ],
            requirements: vec![
                TableRequirement::UuidMatch {
                    uuid: metadata.uuid(),
                },
                TableRequirement::RefSnapshotIdMatch {
                    r#ref: MAIN_BRANCH.to_string(),
                    snapshot_id: parent,
                },
            ],
            written,
        })
    }

    /// `added-*` and `deleted-*` from the files, and totals over what is live afterwards.
    fn summary(
        &self,
        (added, added_spec_id): (&[DataFile], i32),
        carried: &Carried,
        properties: HashMap<String, String>,
    ) -> Summary {
        let metadata = self.table.metadata();
        let schema = metadata.current_schema().clone();
        let mut collector = SnapshotSummaryCollector::default();
        let added_spec = self.partition_spec(added_spec_id);
        for file in added {
            collector.add_file(file, schema.clone(), added_spec.clone());
        }
        for ((spec_id, _), files) in &carried.removed {
            let spec = self.partition_spec(*spec_id);
            for file in files {
                let written_with = schema_of_partition(self.table, &spec, &file.data_file)
                    .unwrap_or_else(|| schema.clone());
                collector.remove_file(&file.data_file, written_with, spec.clone());
            }
        }
        let mut summary = properties;
        summary.extend(collector.build());
        let live = || added.iter().chain(&carried.remaining);
        let of = |content: DataContentType| live().filter(move |f| f.content_type() == content);
        let totals = [
            ("total-data-files", of(DataContentType::Data).count() as u64),
            (
                "total-records",
                of(DataContentType::Data).map(|f| f.record_count()).sum(),
            ),
            (
                "total-files-size",
                live().map(|f| f.file_size_in_bytes()).sum(),
            ),
            (
                "total-delete-files",
                live()
                    .filter(|f| f.content_type() != DataContentType::Data)
                    .count() as u64,
            ),
            (
                "total-position-deletes",
                of(DataContentType::PositionDeletes)
                    .map(|f| f.record_count())
                    .sum(),
            ),
            (
                "total-equality-deletes",
                of(DataContentType::EqualityDeletes)
                    .map(|f| f.record_count())
                    .sum(),
            ),
        ];
        for (key, value) in totals {
            summary.insert(key.to_string(), value.to_string());
        }
        let removed_any = carried.removed.values().any(|files| !files.is_empty());
        Summary {
            operation: if removed_any {
                Operation::Overwrite
            } else {
                Operation::Append
            },
            additional_properties: summary,
        }
    }

    /// The partition spec a manifest was written with (the default one if it is gone).
    fn partition_spec(&self, spec_id: i32) -> iceberg::spec::PartitionSpecRef {
        let metadata = self.table.metadata();
        metadata
            .partition_spec_by_id(spec_id)
            .unwrap_or_else(|| metadata.default_partition_spec())
            .clone()
    }

    fn manifest_writer(
        &self,
        spec_id: i32,
        is_deletes: bool,
        counter: usize,
        written: &mut Vec<String>,
    ) -> Result<ManifestWriter> {
        let metadata = self.table.metadata();
        let path = names::manifest_path(metadata.location(), &self.commit_uuid, counter);
        written.push(path.clone());
        let spec = self.partition_spec(spec_id).as_ref().clone();
        let builder = ManifestWriterBuilder::new(
            self.table.file_io().new_output(&path)?,
            Some(self.snapshot_id),
            metadata.current_schema().clone(),
            spec,
        );
        Ok(match (metadata.format_version(), is_deletes) {
            (FormatVersion::V1, _) => builder.build_v1(),
            (FormatVersion::V2, false) => builder.build_v2_data(),
            (FormatVersion::V2, true) => builder.build_v2_deletes(),
            (FormatVersion::V3, false) => builder.build_v3_data(),
            (FormatVersion::V3, true) => builder.build_v3_deletes(),
        })
    }
}

/// A random positive snapshot id not used by the table yet (as iceberg-rust makes them).
fn unique_snapshot_id(table: &Table) -> i64 {
    loop {
        let (high, low) = Uuid::new_v4().as_u64_pair();
        let id = ((high ^ low) >> 1) as i64;
        if !table.metadata().snapshots().any(|s| s.snapshot_id() == id) {
            return id;
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use iceberg::spec::Literal;

    use super::*;

    #[test]
    fn a_partition_written_before_its_column_was_widened_is_the_same_partition() {
        let before: Struct = [
            Some(Literal::int(5)),
            Some(Literal::float(1.5)),
            Some(Literal::string("é")),
            None,
        ]
        .into_iter()
        .collect();
        let after: Struct = [
            Some(Literal::long(5)),
            Some(Literal::double(1.5)),
            Some(Literal::string("é")),
            None,
        ]
        .into_iter()
        .collect();
        assert_ne!(before, after);
        assert_eq!(widened_partition(&before), widened_partition(&after));
        let other: Struct = [
            Some(Literal::long(6)),
            Some(Literal::double(1.5)),
            None,
            None,
        ]
        .into_iter()
        .collect();
        assert_ne!(widened_partition(&before), widened_partition(&other));
    }
}
