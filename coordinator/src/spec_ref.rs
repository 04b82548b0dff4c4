//! Specs submitted by reference (`SubmitJobRequest.spec_uri`): the coordinator reads the spec,
//! and the `sql_file` it names, from object storage once, when the job is submitted. From then
//! on the job carries the text it read, so a spec rewritten later does not change a queued job.

use std::collections::BTreeMap;

use nightshift_core::access::{AccessError, AccessPolicy, canonical_location, contains};
use nightshift_core::storage::Location;
use object_store::ObjectStoreExt;

/// Why a referenced spec could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SpecRefError {
    #[error("spec_uri `{0}` is not a URL; give one such as s3://bucket/pipelines/daily.toml")]
    NotAUrl(String),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("cannot read {location}: {message}")]
    Read {
        location: String,
        message: String,
        not_found: bool,
    },
    #[error("{location} is {size} bytes; at most {limit} are accepted")]
    TooLarge {
        location: String,
        size: u64,
        limit: usize,
    },
    #[error("{0} is not UTF-8 text")]
    NotText(String),
    #[error("[transform] sql_file `{0}` must be a path below the spec's directory")]
    SqlFileEscapes(String),
}

impl SpecRefError {
    /// A missing or unreadable object is the caller's mistake, not the server's.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            SpecRefError::Read {
                not_found: true,
                ..
            }
        )
    }
}

/// The spec text and its SQL files, read from `uri` after checking it against `access`.
/// `limit` bounds the spec and its files together. Each is read at the canonical location the
/// policy admitted; an `sql_file` must lie below the spec's directory.
pub async fn read_spec(
    uri: &str,
    access: &AccessPolicy,
    limit: usize,
) -> Result<(String, BTreeMap<String, String>), SpecRefError> {
    if !uri.contains("://") {
        return Err(SpecRefError::NotAUrl(uri.to_string()));
    }
    let spec_location = access.admit_location("the spec at", uri)?;
    let spec = read_text(&spec_location, limit).await?;
    let mut files = BTreeMap::new();
    if let Some(sql_file) = sql_file_of(&spec) {
        let escapes = || SpecRefError::SqlFileEscapes(sql_file.clone());
        if sql_file.starts_with('/') || sql_file.contains("://") {
            return Err(escapes());
        }
        let directory = spec_location.url().join(".").map_err(|_| escapes())?;
        let text = format!("{directory}{sql_file}");
        let below = canonical_location(&text).map_err(|_| escapes())?;
        if !contains(&Location::from_url(directory), &below) {
            return Err(escapes());
        }
        let location =
            access.admit_location(&format!("[transform] sql_file `{sql_file}` at"), &text)?;
        let text = read_text(&location, limit.saturating_sub(spec.len())).await?;
        files.insert(sql_file, text);
    }
    Ok((spec, files))
}

/// `[transform] sql_file`, if the spec names one (a spec that does not parse is reported
/// later, with the spec loader's errors).
fn sql_file_of(spec: &str) -> Option<String> {
    let value = spec.parse::<toml::Table>().ok()?;
    Some(
        value
            .get("transform")?
            .get("sql_file")?
            .as_str()?
            .to_string(),
    )
}

async fn read_text(location: &Location, limit: usize) -> Result<String, SpecRefError> {
    let name = location.as_url_string();
    let read_error = |e: &dyn std::fmt::Display, not_found: bool| SpecRefError::Read {
        location: name.clone(),
        message: e.to_string(),
        not_found,
    };
    // A local path must be a regular file: opening a named pipe waits for a writer, and
    // held a coordinator thread for good (a client could wedge the API with a few hundred).
    if let Some(path) = location.local_path()
        && let Ok(meta) = std::fs::metadata(&path)
        && !meta.is_file()
    {
        return Err(read_error(&"not a regular file", false));
    }
    let (store, key) = location.store().map_err(|e| read_error(&e, false))?;
    let object = store.get(&key).await.map_err(|e| {
        let not_found = matches!(e, object_store::Error::NotFound { .. });
        read_error(&e, not_found)
    })?;
    if object.meta.size > limit as u64 {
        return Err(SpecRefError::TooLarge {
            location: name,
            size: object.meta.size,
            limit,
        });
    }
    let bytes = object.bytes().await.map_err(|e| read_error(&e, false))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| SpecRefError::NotText(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn local(dir: &Path) -> AccessPolicy {
        AccessPolicy::new(&[dir.display().to_string()], &[]).unwrap()
    }

    #[tokio::test]
    async fn reads_the_spec_and_its_sql_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sql")).unwrap();
        let spec = "[pipeline]\nname = \"p\"\n[transform]\nsql_file = \"sql/t.sql\"\n";
        std::fs::write(dir.path().join("p.toml"), spec).unwrap();
        std::fs::write(dir.path().join("sql/t.sql"), "SELECT 1").unwrap();
        let uri = format!("file://{}/p.toml", dir.path().display());
        let (text, files) = read_spec(&uri, &local(dir.path()), 1 << 20).await.unwrap();
        assert_eq!(text, spec);
        assert_eq!(files["sql/t.sql"], "SELECT 1");
    }

    #[tokio::test]
    async fn a_named_pipe_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("p.toml");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        let uri = format!("file://{}", fifo.display());
        let policy = local(dir.path());
        let read = read_spec(&uri, &policy, 1 << 20);
        let err = tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect("the read waited for a writer")
            .unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[tokio::test]
    async fn refuses_what_it_should_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let policy = local(&dir.path().join("allowed"));
        let uri = format!("file://{}/p.toml", dir.path().display());
        let err = read_spec(&uri, &policy, 1 << 20).await.unwrap_err();
        assert!(matches!(err, SpecRefError::Access(_)), "{err}");

        let err = read_spec("pipelines/p.toml", &policy, 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(err, SpecRefError::NotAUrl(_)), "{err}");

        std::fs::create_dir_all(dir.path().join("allowed")).unwrap();
        let spec = "[transform]\nsql_file = \"../secret.sql\"\n";
        std::fs::write(dir.path().join("allowed/p.toml"), spec).unwrap();
        let uri = format!("file://{}/allowed/p.toml", dir.path().display());
        let err = read_spec(&uri, &policy, 1 << 20).await.unwrap_err();
        assert!(matches!(err, SpecRefError::SqlFileEscapes(_)), "{err}");

        let err = read_spec(&uri, &policy, 10).await.unwrap_err();
        assert!(
            err.to_string().ends_with("at most 10 are accepted"),
            "{err}"
        );

        let missing = format!("file://{}/allowed/none.toml", dir.path().display());
        let err = read_spec(&missing, &policy, 1 << 20).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(err.to_string().contains("none.toml"), "{err}");
    }
}
