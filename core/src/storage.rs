//! Locations and object stores: one place that turns a path or URL into a store and a key.
//!
//! Iceberg metadata keeps plain absolute paths for local warehouses (what PyIceberg and DuckDB
//! read most reliably) and URLs (`s3://…`) otherwise; DataFusion and `object_store` always want
//! URLs. [`Location`] converts between the two.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, RwLock};

use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use url::Url;

use crate::error::{CoreError, Result};
use crate::local_store::LocalStore;

/// How this process reaches S3 (set once at start-up from the configuration). Credentials
/// come from the environment / AWS default chain / web identity, never from a file.
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub allow_http: bool,
}

static S3_SETTINGS: LazyLock<RwLock<Option<S3Settings>>> = LazyLock::new(|| RwLock::new(None));

/// Object stores of this process by URL prefix (`s3://bucket`), built on first use.
static STORES: LazyLock<RwLock<HashMap<String, Arc<dyn ObjectStore>>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

/// Iceberg FileIO properties for remote storage (`s3.endpoint`, credentials, ...).
static ICEBERG_PROPS: LazyLock<RwLock<HashMap<String, String>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

/// Configures S3 access for the whole process.
pub fn configure_s3(settings: S3Settings) {
    *S3_SETTINGS.write().expect("s3 settings lock") = Some(settings);
    STORES.write().expect("store registry lock").clear();
}

/// Makes `store` serve every location under `prefix` (e.g. `s3://bucket`).
pub fn register_store(prefix: &str, store: Arc<dyn ObjectStore>) {
    STORES
        .write()
        .expect("store registry lock")
        .insert(prefix.trim_end_matches('/').to_string(), store);
}

/// The store for `url`'s scheme and bucket: local filesystem, a registered store, or an S3
/// client built from the configured settings (cached per bucket).
pub fn store_for_url(url: &Url) -> Result<Arc<dyn ObjectStore>> {
    if url.scheme() == "file" {
        return Ok(Arc::new(LocalStore::new()));
    }
    let prefix = url[..url::Position::BeforePath].to_string();
    if let Some(store) = STORES.read().expect("store registry lock").get(&prefix) {
        return Ok(store.clone());
    }
    let store: Arc<dyn ObjectStore> = match (url.scheme(), url.host_str()) {
        ("s3" | "s3a", Some(bucket)) => {
            let settings = S3_SETTINGS
                .read()
                .expect("s3 settings lock")
                .clone()
                .unwrap_or_default();
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_virtual_hosted_style_request(!settings.path_style)
                .with_allow_http(settings.allow_http);
            if let Some(endpoint) = settings.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let Some(region) = settings.region {
                builder = builder.with_region(region);
            }
            Arc::new(builder.build()?)
        }
        _ => Arc::from(object_store::parse_url(url)?.0),
    };
    STORES
        .write()
        .expect("store registry lock")
        .insert(prefix, store.clone());
    Ok(store)
}

/// DataFusion's view of [`store_for_url`], so scans, shuffle reads and writes share clients.
#[derive(Debug, Default)]
pub struct NightshiftStoreRegistry;

impl datafusion::execution::object_store::ObjectStoreRegistry for NightshiftStoreRegistry {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        register_store(&url[..url::Position::BeforePath], store);
        None
    }

    fn get_store(&self, url: &Url) -> datafusion::error::Result<Arc<dyn ObjectStore>> {
        store_for_url(url).map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))
    }
}

/// Sets the FileIO properties Iceberg uses for remote storage.
pub fn set_iceberg_props(props: HashMap<String, String>) {
    *ICEBERG_PROPS.write().expect("props lock") = props;
}

/// The FileIO properties Iceberg uses for remote storage.
pub fn iceberg_props() -> HashMap<String, String> {
    ICEBERG_PROPS.read().expect("props lock").clone()
}

/// Iceberg FileIO for files at `location`: the local filesystem, or OpenDAL with the
/// registered properties for object storage.
pub fn iceberg_file_io(location: &str) -> iceberg::io::FileIO {
    if location.starts_with('/') || location.starts_with("file:") {
        return iceberg::io::FileIO::new_with_fs();
    }
    iceberg::io::FileIOBuilder::new(iceberg_storage_factory(location))
        .with_props(iceberg_props())
        .build()
}

/// The Iceberg storage factory for a warehouse or table at `location`.
pub fn iceberg_storage_factory(location: &str) -> Arc<dyn iceberg::io::StorageFactory> {
    if location.starts_with('/') || location.starts_with("file:") {
        Arc::new(iceberg::io::LocalFsStorageFactory)
    } else {
        Arc::new(iceberg_storage_opendal::OpenDalResolvingStorageFactory::new())
    }
}

/// A directory or file in local or object storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    url: Url,
}

impl Location {
    /// Parses an absolute path, a `file://` URL or an object-store URL. A relative path is
    /// resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        if let Ok(url) = Url::parse(text)
            && url.scheme().len() > 1
        {
            return Ok(Location { url });
        }
        let path = if Path::new(text).is_absolute() {
            PathBuf::from(text)
        } else {
            base.join(text)
        };
        let path = normalize(&path);
        let url = Url::from_file_path(&path).map_err(|_| {
            CoreError::io(
                format!("cannot turn `{}` into a file URL", path.display()),
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            )
        })?;
        Ok(Location { url })
    }

    pub fn from_url(url: Url) -> Self {
        Location { url }
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    pub fn is_local(&self) -> bool {
        self.url.scheme() == "file"
    }

    /// A local filesystem path, for local locations.
    pub fn local_path(&self) -> Option<PathBuf> {
        self.is_local()
            .then(|| self.url.to_file_path().ok())
            .flatten()
    }

    /// The form Iceberg metadata stores: a plain path for local files, the URL otherwise.
    pub fn to_iceberg_string(&self) -> String {
        match self.local_path() {
            Some(p) => p.display().to_string(),
            None => self.url.to_string().trim_end_matches('/').to_string(),
        }
    }

    /// The URL as a string without a trailing slash.
    pub fn as_url_string(&self) -> String {
        self.url.to_string().trim_end_matches('/').to_string()
    }

    /// A child location.
    pub fn join(&self, segment: &str) -> Location {
        let mut url = self.url.clone();
        let path = format!("{}/{}", url.path().trim_end_matches('/'), segment);
        url.set_path(&path);
        Location { url }
    }

    /// The object store that holds this location and the key within it.
    pub fn store(&self) -> Result<(Arc<dyn ObjectStore>, ObjectPath)> {
        if self.is_local() {
            let path = self.local_path().ok_or_else(|| {
                CoreError::io(
                    format!("bad file URL {}", self.url),
                    std::io::Error::from(std::io::ErrorKind::InvalidInput),
                )
            })?;
            let key = ObjectPath::from_absolute_path(&path)
                .map_err(|e| CoreError::ObjectStore(e.into()))?;
            return Ok((Arc::new(LocalStore::new()), key));
        }
        let key = ObjectPath::from_url_path(self.url.path())
            .map_err(|e| CoreError::ObjectStore(e.into()))?;
        Ok((store_for_url(&self.url)?, key))
    }

    /// Deletes everything under this location. Missing is not an error.
    pub async fn delete_recursive(&self) -> Result<usize> {
        if let Some(path) = self.local_path() {
            return match tokio::fs::remove_dir_all(&path).await {
                Ok(()) => Ok(1),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
                Err(e) => Err(CoreError::io(format!("delete {}", path.display()), e)),
            };
        }
        let (store, key) = self.store()?;
        let keys = store.list(Some(&key)).map_ok(|m| m.location).boxed();
        let deleted = store.delete_stream(keys).try_collect::<Vec<_>>().await?;
        Ok(deleted.len())
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_iceberg_string())
    }
}

/// Removes `.` and `..` components without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Lists every object below `location` (recursively) with its size.
pub async fn list_objects(location: &Location) -> Result<Vec<(Location, u64)>> {
    Ok(list_objects_meta(location)
        .await?
        .into_iter()
        .map(|(loc, meta)| (loc, meta.size))
        .collect())
}

/// Lists every object below `location` (recursively) with its metadata.
pub async fn list_objects_meta(
    location: &Location,
) -> Result<Vec<(Location, object_store::ObjectMeta)>> {
    let (store, key) = location.store()?;
    let mut out = Vec::new();
    let mut stream = store.list(Some(&key));
    while let Some(meta) = stream.next().await {
        let meta = match meta {
            Ok(meta) => meta,
            Err(object_store::Error::NotFound { .. }) => break,
            Err(e) => return Err(e.into()),
        };
        let url = object_url(location, &meta.location)?;
        out.push((Location::from_url(url), meta));
    }
    Ok(out)
}

/// The URL of the object `key` listed below `location`, naming exactly that object: the
/// key's segments are percent-encoded, so a `%` in a name (a partition directory escapes
/// `:` as `%3A`) is not decoded into another name when the URL is opened. (Writing the key
/// into the URL raw made every cleanup, expiry and orphan removal miss the files of such
/// partitions: it deleted names that did not exist.) This changes which file a deletion
/// reaches, never whether a file may be deleted: every caller still deletes only what its
/// own checks allow (a job's sweep: names parsed as the job's that no snapshot's manifest
/// entry names; expiry: files no retained snapshot reads; orphan removal: those, a day
/// old), and references are compared by file name, which holds no `%`.
fn object_url(location: &Location, key: &ObjectPath) -> Result<Url> {
    let bad_url = || {
        CoreError::io(
            format!("cannot name the object {key} below {location} as a URL"),
            std::io::Error::from(std::io::ErrorKind::InvalidData),
        )
    };
    if location.is_local() {
        let path = LocalFileSystem::new()
            .path_to_filesystem(key)
            .map_err(CoreError::ObjectStore)?;
        return Url::from_file_path(path).map_err(|()| bad_url());
    }
    let mut url = location.url().clone();
    url.set_path("/");
    url.path_segments_mut()
        .map_err(|()| bad_url())?
        .pop_if_empty()
        .extend(key.as_ref().split('/'));
    Ok(url)
}

/// Deletes the given objects; missing ones are skipped.
pub async fn delete_objects(locations: &[Location]) -> Result<()> {
    for location in locations {
        let (store, key) = location.store()?;
        match store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_against_base() {
        let loc = Location::parse("data/../in/orders.csv", Path::new("/srv/p")).unwrap();
        assert_eq!(loc.to_iceberg_string(), "/srv/p/in/orders.csv");
        assert_eq!(loc.url().as_str(), "file:///srv/p/in/orders.csv");
        let s3 = Location::parse("s3://bucket/wh", Path::new("/")).unwrap();
        assert!(!s3.is_local());
        assert_eq!(s3.join("ns/t").as_url_string(), "s3://bucket/wh/ns/t");
    }
}

#[cfg(test)]
mod listing_tests {
    use super::*;

    /// Partition directories hold escaped values (`%3A` for `:`, `%C3%A9` for `é`): what
    /// a listing names is the file on disk, and deleting it deletes that file.
    #[tokio::test]
    async fn listed_files_with_escapes_in_their_names_can_be_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "data/ts=2024-03-10+07%3A00%3A00+UTC/a.parquet",
            "data/k=%C3%A9/b.parquet",
            "data/k=50%25/c.parquet",
            "data/k=é ü/d.parquet",
            "data/plain.parquet",
        ];
        for name in names {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"x").unwrap();
        }
        let root = Location::parse(dir.path().to_str().unwrap(), Path::new("/")).unwrap();
        let listed = list_objects(&root).await.unwrap();
        let mut on_disk: Vec<String> = listed
            .iter()
            .map(|(l, _)| {
                let path = l.local_path().unwrap();
                assert!(
                    path.is_file(),
                    "{path:?} (from {}) is not the listed file",
                    l.url()
                );
                path.strip_prefix(dir.path()).unwrap().display().to_string()
            })
            .collect();
        on_disk.sort();
        let mut expected: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        expected.sort();
        assert_eq!(on_disk, expected);
        let files: Vec<Location> = listed.into_iter().map(|(l, _)| l).collect();
        delete_objects(&files).await.unwrap();
        for name in names {
            assert!(!dir.path().join(name).exists(), "{name} was not deleted");
        }
    }
}
