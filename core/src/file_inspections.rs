//! What inspecting a source's files decided, remembered by the process while the files stay
//! the same versions: the schema inferred from them, and which inferred integer columns have
//! a leading zero in their text. The job API inspects a submission's sources to check it,
//! and the job inspects them again when it is planned; the leading-zero probe reads every
//! row of a CSV source, and a JSON source's inference reads every record. Without this, a
//! 1 GB CSV file was read in full twice before the job's first task, and every submission
//! over unchanged files paid for both again.
//!
//! A decision is only remembered for files whose version the store can tell (an entity tag:
//! S3 gives a digest of the content, a local file its inode, modification time in
//! nanoseconds and size). A file without one is inspected every time: its size and a
//! modification time in whole seconds would not tell a rewrite in the same second apart.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::datatypes::SchemaRef;
use sha2::{Digest, Sha256};

/// One file as its store reports it when it is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileVersion {
    /// The file's location.
    pub path: String,
    pub size: u64,
    /// The store's entity tag for this content of the file, if it gives one.
    pub tag: Option<String>,
}

/// A local file's entity tag, as object_store's local file system tags it: the inode, the
/// modification time in nanoseconds and the size.
pub fn local_tag(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())?;
    Some(format!(
        "{:x}-{:x}-{:x}",
        meta.ino(),
        modified.as_nanos(),
        meta.len()
    ))
}

/// What a decision was made about: its kind, how the files were read (the reader's options,
/// and anything else the decision depends on) and the files' versions. `None` when a file's
/// version cannot be told, or there are no files: then nothing is remembered.
pub fn inspection_key(
    decision: &str,
    reading: &str,
    files: &[FileVersion],
) -> Option<InspectionKey> {
    if files.is_empty() || files.iter().any(|f| f.tag.is_none()) {
        return None;
    }
    let mut files: Vec<&FileVersion> = files.iter().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut digest = Sha256::new();
    for part in [decision, reading] {
        digest.update((part.len() as u64).to_le_bytes());
        digest.update(part.as_bytes());
    }
    for file in files {
        let tag = file.tag.as_deref().unwrap_or_default();
        for part in [file.path.as_str(), tag] {
            digest.update((part.len() as u64).to_le_bytes());
            digest.update(part.as_bytes());
        }
        digest.update(file.size.to_le_bytes());
    }
    Some(InspectionKey(digest.finalize().into()))
}

/// The digest of a decision's kind, reading and file versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InspectionKey([u8; 32]);

/// What was decided.
#[derive(Debug, Clone)]
pub enum Inspection {
    /// The schema inferred from the files.
    Schema(SchemaRef),
    /// For each column probed, in order: whether its text has a leading zero.
    LeadingZeros(Arc<[bool]>),
}

/// Decisions kept at most: each is a schema or a few flags.
const REMEMBERED: u64 = 4096;

static REMEMBERED_INSPECTIONS: LazyLock<moka::future::Cache<InspectionKey, Inspection>> =
    LazyLock::new(|| moka::future::Cache::new(REMEMBERED));

/// The decision remembered under `key`.
pub async fn remembered(key: Option<InspectionKey>) -> Option<Inspection> {
    REMEMBERED_INSPECTIONS.get(&key?).await
}

/// Remembers `inspection` under `key` (nothing when `key` is `None`).
pub async fn remember(key: Option<InspectionKey>, inspection: Inspection) {
    if let Some(key) = key {
        REMEMBERED_INSPECTIONS.insert(key, inspection).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64, tag: Option<&str>) -> FileVersion {
        FileVersion {
            path: path.to_string(),
            size,
            tag: tag.map(str::to_string),
        }
    }

    #[test]
    fn the_same_files_read_the_same_way_have_the_same_key() {
        let a = [
            file("s3://b/x/1.csv", 10, Some("e1")),
            file("s3://b/x/2.csv", 20, Some("e2")),
        ];
        let listed_in_another_order = [a[1].clone(), a[0].clone()];
        assert_eq!(
            inspection_key("schema", "csv ,", &a),
            inspection_key("schema", "csv ,", &listed_in_another_order)
        );
    }

    #[test]
    fn any_change_of_a_file_or_of_the_reading_is_another_key() {
        let files = vec![
            file("s3://b/x/1.csv", 10, Some("e1")),
            file("s3://b/x/2.csv", 20, Some("e2")),
        ];
        let key = inspection_key("schema", "csv ,", &files).unwrap();
        let mut rewritten = files.clone();
        rewritten[1].tag = Some("e3".into());
        let mut grown = files.clone();
        grown[1].size = 21;
        let mut renamed = files.clone();
        renamed[1].path = "s3://b/x/3.csv".into();
        let mut added = files.clone();
        added.push(file("s3://b/x/4.csv", 1, Some("e4")));
        let one_removed = &files[..1];
        for other in [&rewritten[..], &grown, &renamed, &added, one_removed] {
            assert_ne!(inspection_key("schema", "csv ,", other), Some(key));
        }
        assert_ne!(inspection_key("schema", "csv ;", &files), Some(key));
        assert_ne!(inspection_key("leading-zeros", "csv ,", &files), Some(key));
    }

    #[test]
    fn parts_of_a_key_do_not_run_into_each_other() {
        // Lengths are part of the digest: the same characters split otherwise differ.
        assert_ne!(
            inspection_key("ab", "c", &[file("f", 1, Some("t"))]),
            inspection_key("a", "bc", &[file("f", 1, Some("t"))])
        );
        assert_ne!(
            inspection_key("d", "r", &[file("f1", 1, Some("t"))]),
            inspection_key("d", "r", &[file("f", 1, Some("1t"))])
        );
    }

    #[test]
    fn files_whose_version_cannot_be_told_are_not_remembered() {
        let untagged = [
            file("s3://b/x/1.csv", 10, Some("e1")),
            file("s3://b/x/2.csv", 20, None),
        ];
        assert_eq!(inspection_key("schema", "csv", &untagged), None);
        assert_eq!(inspection_key("schema", "csv", &[]), None);
    }

    #[test]
    fn a_local_files_version_changes_when_it_is_rewritten_with_the_same_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.csv");
        std::fs::write(&path, "id\n7\n").unwrap();
        let before = local_tag(&std::fs::metadata(&path).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(5));
        std::fs::write(&path, "id\n0\n").unwrap();
        let after = local_tag(&std::fs::metadata(&path).unwrap());
        assert!(before.is_some());
        assert_ne!(before, after);
    }

    #[tokio::test]
    async fn a_decision_is_remembered_under_its_key_only() {
        let files = [file("mem://remembered/1.csv", 3, Some("only-this-test"))];
        let key = inspection_key("leading-zeros", "test", &files);
        assert!(remembered(key).await.is_none());
        remember(key, Inspection::LeadingZeros(Arc::from([true, false]))).await;
        match remembered(key).await {
            Some(Inspection::LeadingZeros(zeros)) => assert_eq!(&*zeros, &[true, false]),
            other => panic!("remembered {other:?}"),
        }
        let other = inspection_key("leading-zeros", "test 2", &files);
        assert!(remembered(other).await.is_none());
        remember(None, Inspection::LeadingZeros(Arc::from([true]))).await;
    }
}
