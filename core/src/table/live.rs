//! The live files of a snapshot: what compaction, partition retention and a merge choose
//! from. Read once here from the snapshot's manifests (with the spec each was written with),
//! or planned as scan tasks (with the delete files that apply to each).

use futures::TryStreamExt;
use iceberg::scan::FileScanTask;
use iceberg::spec::{ManifestContentType, ManifestEntryRef, SnapshotRef};
use iceberg::table::Table;

/// A live (added or existing) manifest entry of a snapshot.
#[derive(Debug, Clone)]
pub struct LiveEntry {
    /// The partition spec of the manifest that lists it.
    pub spec_id: i32,
    /// Whether that manifest lists data files or delete files.
    pub content: ManifestContentType,
    pub entry: ManifestEntryRef,
}

/// Every live entry of `snapshot`'s manifests, data and delete files.
pub async fn live_entries(
    table: &Table,
    snapshot: &SnapshotRef,
) -> iceberg::Result<Vec<LiveEntry>> {
    let list = table.manifest_list_reader(snapshot).load().await?;
    let mut live = Vec::new();
    for manifest_file in list.entries() {
        let manifest = manifest_file.load_manifest(table.file_io()).await?;
        live.extend(
            manifest
                .entries()
                .iter()
                .filter(|e| e.is_alive())
                .map(|entry| LiveEntry {
                    spec_id: manifest_file.partition_spec_id,
                    content: manifest_file.content,
                    entry: entry.clone(),
                }),
        );
    }
    Ok(live)
}

/// The scan tasks of every live data file of snapshot `snapshot_id` (all columns), each with
/// the delete files that apply to it.
pub async fn scan_tasks(table: &Table, snapshot_id: i64) -> iceberg::Result<Vec<FileScanTask>> {
    table
        .scan()
        .snapshot_id(snapshot_id)
        .select_all()
        .build()?
        .plan_files()
        .await?
        .try_collect()
        .await
}
