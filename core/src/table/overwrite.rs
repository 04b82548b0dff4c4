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
//! Replacing only some partitions (dynamic overwrite, backfill) is this same producer with a
//! filter on which live files are marked deleted.

use std::collections::{BTreeMap, HashMap};

use iceberg::spec::{
    DataFile, FormatVersion, MAIN_BRANCH, ManifestContentType, ManifestFile, ManifestListWriter,
    ManifestWriter, ManifestWriterBuilder, Operation, Snapshot, SnapshotReference,
    SnapshotRetention, SnapshotSummaryCollector, Summary,
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

/// A live file of the current snapshot, with the sequence numbers a `DELETED` entry keeps.
struct LiveFile {
    data_file: DataFile,
    sequence_number: i64,
    file_sequence_number: Option<i64>,
}

/// Builds the snapshot that replaces all of `table`'s rows with `added` (none: the table is
/// emptied), which were written with partition spec `added_spec_id`. `properties` go into
/// the snapshot summary.
pub async fn produce_overwrite(
    table: &Table,
    added: Vec<DataFile>,
    added_spec_id: i32,
    properties: HashMap<String, String>,
) -> Result<ProducedSnapshot> {
    let producer = Producer::new(table);
    let removed = producer.live_files().await?;
    producer
        .produce(added, added_spec_id, removed, properties)
        .await
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

    /// Every live entry of the current snapshot, grouped by partition spec and content.
    async fn live_files(&self) -> Result<BTreeMap<(i32, bool), Vec<LiveFile>>> {
        let mut live: BTreeMap<(i32, bool), Vec<LiveFile>> = BTreeMap::new();
        let Some(current) = self.table.metadata().current_snapshot() else {
            return Ok(live);
        };
        let list = self.table.manifest_list_reader(current).load().await?;
        for manifest_file in list.entries() {
            let manifest = manifest_file.load_manifest(self.table.file_io()).await?;
            let is_deletes = manifest_file.content == ManifestContentType::Deletes;
            for entry in manifest.entries().iter().filter(|e| e.is_alive()) {
                let sequence_number = entry.sequence_number().unwrap_or(0);
                live.entry((manifest_file.partition_spec_id, is_deletes))
                    .or_default()
                    .push(LiveFile {
                        data_file: entry.data_file().clone(),
                        sequence_number,
                        file_sequence_number: entry.file_sequence_number.or(Some(sequence_number)),
                    });
            }
        }
        Ok(live)
    }

    async fn produce(
        self,
        added: Vec<DataFile>,
        added_spec_id: i32,
        removed: BTreeMap<(i32, bool), Vec<LiveFile>>,
        properties: HashMap<String, String>,
    ) -> Result<ProducedSnapshot> {
        let metadata = self.table.metadata();
        let summary = self.summary((&added, added_spec_id), &removed, properties);
        let mut written = Vec::new();
        let mut manifests: Vec<ManifestFile> = Vec::new();
        if !added.is_empty() {
            let spec_id = added_spec_id;
            let mut writer = self.manifest_writer(spec_id, false, manifests.len(), &mut written)?;
            for file in added {
                writer.add_file(file, self.sequence_number)?;
            }
            manifests.push(writer.write_manifest_file().await?);
        }
        for ((spec_id, is_deletes), files) in removed {
            let mut writer =
                self.manifest_writer(spec_id, is_deletes, manifests.len(), &mut written)?;
            for file in files {
                writer.add_delete_file(
                    file.data_file,
                    file.sequence_number,
                    file.file_sequence_number,
                )?;
            }
            manifests.push(writer.write_manifest_file().await?);
        }

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

    /// `added-*` and `deleted-*` from the files, and totals equal to what was added: after a
    /// full overwrite the added files are all there is.
    fn summary(
        &self,
        (added, added_spec_id): (&[DataFile], i32),
        removed: &BTreeMap<(i32, bool), Vec<LiveFile>>,
        properties: HashMap<String, String>,
    ) -> Summary {
        let metadata = self.table.metadata();
        let schema = metadata.current_schema().clone();
        let mut collector = SnapshotSummaryCollector::default();
        let added_spec = self.partition_spec(added_spec_id);
        for file in added {
            collector.add_file(file, schema.clone(), added_spec.clone());
        }
        for ((spec_id, _), files) in removed {
            let spec = self.partition_spec(*spec_id);
            for file in files {
                collector.remove_file(&file.data_file, schema.clone(), spec.clone());
            }
        }
        let mut summary = properties;
        summary.extend(collector.build());
        let totals = [
            ("total-data-files", added.len() as u64),
            (
                "total-records",
                added.iter().map(|f| f.record_count()).sum(),
            ),
            (
                "total-files-size",
                added.iter().map(|f| f.file_size_in_bytes()).sum(),
            ),
            ("total-delete-files", 0),
            ("total-position-deletes", 0),
            ("total-equality-deletes", 0),
        ];
        for (key, value) in totals {
            summary.insert(key.to_string(), value.to_string());
        }
        let removed_any = removed.values().any(|files| !files.is_empty());
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
