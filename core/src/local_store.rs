//! The local file system as an object store whose reads open each file through
//! [`crate::access::open_local`], so a process that confines reads to the allowed locations
//! never follows a link out of one, however the file is reached (a DataFusion scan, a schema
//! inference, a spec read by reference). Writes, listings, copies and deletes are
//! `object_store`'s [`LocalFileSystem`] unchanged: only reading can be turned against the
//! policy, and the engine writes only below its own warehouse and scratch locations.
//!
//! `LocalFileSystem` opens files by path inside `get_opts` and `get_ranges`, with no hook for
//! how, so those two are written here; the ETag is computed as `object_store` computes it
//! (inode, modification time and size), so listings and reads agree.

use std::fmt;
use std::fs::{File, Metadata};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    Attributes, CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    Result,
};

const STORE: &str = "LocalFileSystem";

/// See the module's documentation.
#[derive(Debug, Default)]
pub struct LocalStore {
    inner: LocalFileSystem,
}

impl LocalStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl fmt::Display for LocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalStore({})", self.inner)
    }
}

/// `object_store`'s error for a file that could not be opened or read.
fn io_error(e: std::io::Error, path: &std::path::Path) -> object_store::Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => object_store::Error::NotFound {
            path: path.display().to_string(),
            source: Box::new(e),
        },
        std::io::ErrorKind::PermissionDenied => object_store::Error::PermissionDenied {
            path: path.display().to_string(),
            source: Box::new(e),
        },
        _ => object_store::Error::Generic {
            store: STORE,
            source: Box::new(e),
        },
    }
}

fn object_meta(metadata: &Metadata, location: Path) -> ObjectMeta {
    let modified = metadata
        .modified()
        .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
    let micros = modified
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    ObjectMeta {
        location,
        last_modified: modified.into(),
        size: metadata.len(),
        e_tag: Some(format!(
            "{:x}-{micros:x}-{:x}",
            metadata.ino(),
            metadata.len()
        )),
        version: None,
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work).await?
}

fn open(path: &std::path::Path) -> Result<File> {
    crate::access::open_local(path).map_err(|e| io_error(e, path))
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let path = self.inner.path_to_filesystem(location)?;
        let location = location.clone();
        blocking(move || {
            let file = open(&path)?;
            let metadata = file.metadata().map_err(|e| io_error(e, &path))?;
            let meta = object_meta(&metadata, location);
            options.check_preconditions(&meta)?;
            let range = match options.range {
                Some(range) => {
                    range
                        .as_range(meta.size)
                        .map_err(|e| object_store::Error::Generic {
                            store: STORE,
                            source: Box::new(e),
                        })?
                }
                None => 0..meta.size,
            };
            Ok(GetResult {
                payload: GetResultPayload::File(file, path),
                attributes: Attributes::default(),
                range,
                meta,
            })
        })
        .await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let path = self.inner.path_to_filesystem(location)?;
        let ranges = ranges.to_vec();
        blocking(move || {
            let file = open(&path)?;
            ranges
                .into_iter()
                .map(|range| {
                    let mut buffer = vec![0; (range.end - range.start) as usize];
                    file.read_exact_at(&mut buffer, range.start)
                        .map_err(|e| io_error(e, &path))?;
                    Ok(Bytes::from(buffer))
                })
                .collect()
        })
        .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use object_store::ObjectStoreExt;

    use super::*;

    /// Reads, ranges and metadata agree with `object_store`'s own local store.
    #[tokio::test]
    async fn reads_as_object_stores_local_file_system_does() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.csv");
        std::fs::write(&file, "id,name\n1,one\n2,two\n").unwrap();
        let key = Path::from_absolute_path(&file).unwrap();
        let ours = LocalStore::new();
        let theirs = LocalFileSystem::new();

        let (a, b) = (
            ours.get(&key).await.unwrap(),
            theirs.get(&key).await.unwrap(),
        );
        assert_eq!(a.meta, b.meta);
        assert_eq!(a.bytes().await.unwrap(), b.bytes().await.unwrap());
        assert_eq!(
            ours.get_range(&key, 3..9).await.unwrap(),
            theirs.get_range(&key, 3..9).await.unwrap()
        );
        assert_eq!(
            ours.get_ranges(&key, &[0..2, 8..13]).await.unwrap(),
            theirs.get_ranges(&key, &[0..2, 8..13]).await.unwrap()
        );
        assert_eq!(
            ours.head(&key).await.unwrap(),
            theirs.head(&key).await.unwrap()
        );
        let missing = Path::from_absolute_path(dir.path().join("missing.csv")).unwrap();
        assert!(matches!(
            ours.get(&missing).await,
            Err(object_store::Error::NotFound { .. })
        ));
        assert_eq!(
            ours.get_range(&key, 10..100).await.ok(),
            theirs.get_range(&key, 10..100).await.ok()
        );
    }
}
