//! What a table's snapshots reference: the one answer every cleanup asks before deleting.
//!
//! Architecture invariant: no cleanup deletes a file that any snapshot of the table
//! references, current or historical, whoever wrote it. [`TableReferences`] holds the data
//! and delete files named by the manifests of the table's snapshots, plus the manifests and
//! manifest lists themselves.
//!
//! Which manifest entries count is [`Entries`]: a job's own cleanups count every entry, a
//! `DELETED` one included ([`Entries::All`], keeping more than they must); snapshot expiry
//! and orphan removal count what a reader of some snapshot reads ([`Entries::Live`]:
//! `ADDED` and `EXISTING`). A `DELETED` entry only records that its snapshot stopped reading
//! the file; a snapshot that still reads it lists it as live in one of its own manifests,
//! so no snapshot's reader loses a file that `Live` leaves out. Counting `DELETED` entries
//! there kept every file an overwrite or a compaction replaced for as long as the replacing
//! snapshot lived.
//!
//! Files are compared by their last path segment. The engine's data-file and manifest names
//! are unique (job, attempt, random nonce; commit UUIDs), so a name is as good as the whole
//! path for what we write, and a segment cannot be spelled two ways (`/w/t` and `file:///w/t`,
//! or a partition directory percent-encoded by one writer and not another): a comparison by
//! whole paths could take a referenced file for an unreferenced one; this one can only keep
//! more than it must.

use std::collections::HashMap;

use iceberg::spec::ManifestStatus;
use iceberg::table::Table;

use crate::error::Result;

/// Every file the snapshots of one table reference, by name.
#[derive(Debug, Default, Clone)]
pub struct TableReferences {
    /// File name → the path a manifest gave it.
    names: HashMap<String, String>,
}

/// Which manifest entries name a referenced file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entries {
    /// Every entry, `DELETED` included: what a job's own cleanups keep.
    All,
    /// `ADDED` and `EXISTING` entries, the files some snapshot's reader reads: what expiry
    /// and orphan removal keep.
    Live,
}

impl Entries {
    /// Whether an entry of `status` names a referenced file.
    pub fn counts(self, status: ManifestStatus) -> bool {
        match self {
            Entries::All => true,
            Entries::Live => status != ManifestStatus::Deleted,
        }
    }
}

impl TableReferences {
    /// Every file any entry of any manifest of any snapshot names ([`Entries::All`]).
    pub async fn load(table: &Table) -> Result<Self> {
        Self::load_entries(table, Entries::All).await
    }

    /// The files some snapshot's reader reads ([`Entries::Live`]), with every manifest list
    /// and manifest.
    pub async fn load_live(table: &Table) -> Result<Self> {
        Self::load_entries(table, Entries::Live).await
    }

    /// Reads every snapshot's manifest list and every manifest they name (each manifest once),
    /// keeping the files of the entries `entries` counts.
    async fn load_entries(table: &Table, entries: Entries) -> Result<Self> {
        let mut references = TableReferences::default();
        let mut manifests_seen = std::collections::HashSet::new();
        let metadata = table.metadata();
        for snapshot in metadata.snapshots() {
            references.insert(snapshot.manifest_list());
            let list = table.manifest_list_reader(snapshot).load().await?;
            for manifest_file in list.entries() {
                if !manifests_seen.insert(manifest_file.manifest_path.clone()) {
                    continue;
                }
                references.insert(&manifest_file.manifest_path);
                let manifest = manifest_file.load_manifest(table.file_io()).await?;
                for entry in manifest.entries() {
                    if entries.counts(entry.status()) {
                        references.insert(entry.file_path());
                    }
                }
            }
        }
        Ok(references)
    }

    /// Adds a referenced path (for tests and for files about to be committed).
    pub fn insert(&mut self, path: &str) {
        self.names
            .entry(file_name(path).into_owned())
            .or_insert_with(|| path.to_string());
    }

    /// The referenced files' paths, as manifests give them.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.names.values().map(String::as_str)
    }

    /// Whether a file at `path` (any spelling: plain path or URL) is referenced.
    pub fn references(&self, path: &str) -> bool {
        self.names.contains_key(file_name(path).as_ref())
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The last segment of a path or URL, percent-decoded.
fn file_name(path: &str) -> std::borrow::Cow<'_, str> {
    let last = path.rsplit('/').next().unwrap_or(path);
    percent_encoding::percent_decode_str(last).decode_utf8_lossy()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_file_are_one_reference() {
        let mut refs = TableReferences::default();
        refs.insert("/w/ns/t/data/day=2024-01-01/etl-s1-p0-a1-deadbeef-00000.parquet");
        for same in [
            "file:///w/ns/t/data/day=2024-01-01/etl-s1-p0-a1-deadbeef-00000.parquet",
            "s3://b/w/ns/t/data/day%3D2024-01-01/etl-s1-p0-a1-deadbeef-00000.parquet",
            "etl-s1-p0-a1-deadbeef-00000.parquet",
            "/w/ns/t/data/etl-s1-p0-a1-deadbeef%2D00000.parquet",
        ] {
            assert!(refs.references(same), "{same}");
        }
        assert!(!refs.references("/w/ns/t/data/etl-s1-p0-a1-deadbeef-00001.parquet"));
        assert!(!refs.references("/w/ns/t/data/etl-s1-p0-a1-deadbeee-00000.parquet"));
    }

    #[test]
    fn a_deleted_entry_is_a_reference_for_job_cleanups_and_not_for_expiry_or_orphans() {
        use ManifestStatus::*;
        for status in [Added, Existing, Deleted] {
            assert!(Entries::All.counts(status), "{status:?}");
        }
        assert!(Entries::Live.counts(Added));
        assert!(Entries::Live.counts(Existing));
        assert!(!Entries::Live.counts(Deleted));
    }
}
