//! The one form of a location that both the access check and the reader use.
//!
//! A spec names a location as text: an absolute path, a `file://` URL or an object-store URL,
//! perhaps percent-encoded, with `//`, `.` and `..` segments, and (on a local disk) perhaps
//! through symbolic links. [`canonical_location`] turns that text into what a reader will
//! actually open: decoded exactly once, dot segments resolved, and for local paths every
//! existing directory resolved through its links. The policy compares that form, and the
//! coordinator hands that same form to the readers, so the check and the read cannot
//! disagree about which file is meant.

use std::path::PathBuf;

use percent_encoding::percent_decode_str;
use url::Url;

use crate::storage::Location;

/// Why a location's text cannot be turned into a canonical location.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LocationError {
    #[error("it is not a URL or an absolute path")]
    NotAbsolute,
    #[error("it is not a URL this engine reads: {0}")]
    Malformed(String),
    #[error("after decoding it still holds `%` (a double-encoded name is not accepted)")]
    DoubleEncoded,
    #[error("it holds a control character")]
    ControlCharacter,
}

/// Characters that make a path segment a glob pattern (as the `glob` crate and DataFusion's
/// listing read them).
const GLOB_CHARACTERS: [char; 3] = ['*', '?', '['];

/// The canonical form of `text`, which must be absolute (a URL or a path starting with `/`).
///
/// - URLs are decoded once (`%2F` is a `/`, `%2E%2E` is `..`); text that still holds a `%`
///   afterwards is refused rather than guessed at.
/// - Empty and `.` segments are dropped and `..` removes the segment before it; at the root it
///   stays at the root, as the operating system (and the URL standard) have it.
/// - Local paths are resolved through symbolic links as far as the path exists (up to the
///   first glob segment), as the operating system will when the file is opened.
pub fn canonical_location(text: &str) -> Result<Location, LocationError> {
    if text.chars().any(char::is_control) {
        return Err(LocationError::ControlCharacter);
    }
    match split_url(text) {
        Some((scheme, authority, path)) => canonical_url(&scheme, authority, path),
        None if text.starts_with('/') => canonical_local(text),
        None => Err(LocationError::NotAbsolute),
    }
}

/// `scheme://authority/path` split by hand: a URL parser would already resolve dot
/// segments in the still-encoded path (`a%2Fb/..` loses `a%2Fb`, a segment the reader sees
/// as two), so the path is taken as written and decoded before anything is resolved.
fn split_url(text: &str) -> Option<(String, &str, &str)> {
    let (scheme, rest) = text.split_once("://")?;
    let valid = scheme.len() > 1
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !valid {
        return None;
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    Some((scheme.to_ascii_lowercase(), authority, path))
}

fn canonical_url(scheme: &str, authority: &str, path: &str) -> Result<Location, LocationError> {
    if path.contains(['?', '#']) || authority.contains(['?', '#']) {
        return Err(LocationError::Malformed(
            "a location has no `?query` or `#fragment`".to_string(),
        ));
    }
    let decoded = decode_once(path)?;
    if scheme == "file" {
        if !(authority.is_empty() || authority.eq_ignore_ascii_case("localhost")) {
            return Err(LocationError::Malformed(
                "a file URL names no host (file:///path)".to_string(),
            ));
        }
        return canonical_local(&decoded);
    }
    let mut url = Url::parse(&format!("{scheme}://{authority}/"))
        .map_err(|e| LocationError::Malformed(e.to_string()))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(LocationError::Malformed(format!(
            "a {scheme}:// URL names its bucket"
        )));
    }
    let (segments, directory) = resolve_dots(&decoded);
    url.set_path(&joined(&segments, directory));
    Ok(Location::from_url(url))
}

fn canonical_local(path: &str) -> Result<Location, LocationError> {
    let (segments, directory) = resolve_dots(path);
    let resolved = resolve_links(&segments);
    let url = if directory {
        Url::from_directory_path(&resolved)
    } else {
        Url::from_file_path(&resolved)
    };
    url.map(Location::from_url)
        .map_err(|()| LocationError::Malformed(format!("{} is not a path", resolved.display())))
}

/// `text` percent-decoded once; a `%` left over means it was encoded twice (or holds a
/// literal `%`), which is refused.
fn decode_once(text: &str) -> Result<String, LocationError> {
    let decoded = percent_decode_str(text)
        .decode_utf8()
        .map_err(|_| LocationError::Malformed("its decoded path is not UTF-8".to_string()))?;
    if decoded.contains('%') {
        return Err(LocationError::DoubleEncoded);
    }
    if decoded.chars().any(char::is_control) {
        return Err(LocationError::ControlCharacter);
    }
    Ok(decoded.into_owned())
}

/// The path's segments with empty and `.` segments dropped and `..` applied, and whether the
/// path names a directory (ends in `/`).
fn resolve_dots(path: &str) -> (Vec<&str>, bool) {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            name => segments.push(name),
        }
    }
    let directory = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    let directory = directory && !segments.is_empty();
    (segments, directory)
}

fn joined(segments: &[&str], directory: bool) -> String {
    let mut path = format!("/{}", segments.join("/"));
    if directory {
        path.push('/');
    }
    path
}

/// The local path of `segments` with its longest existing literal prefix resolved through
/// symbolic links; the rest (missing directories, glob patterns) follows unchanged.
fn resolve_links(segments: &[&str]) -> PathBuf {
    let literal = segments
        .iter()
        .position(|s| s.contains(GLOB_CHARACTERS))
        .unwrap_or(segments.len());
    for existing in (0..=literal).rev() {
        let prefix: PathBuf = std::iter::once("/")
            .chain(segments[..existing].iter().copied())
            .collect();
        if let Ok(resolved) = std::fs::canonicalize(&prefix) {
            return segments[existing..]
                .iter()
                .fold(resolved, |path, segment| path.join(segment));
        }
    }
    std::iter::once("/")
        .chain(segments.iter().copied())
        .collect()
}

/// Whether `inner` lies at or below `prefix`, both canonical: same scheme and bucket, and
/// `prefix`'s path segments begin `inner`'s.
pub fn contains(prefix: &Location, inner: &Location) -> bool {
    let (p, i) = (prefix.url(), inner.url());
    if p.scheme() != i.scheme() || p.host_str() != i.host_str() || p.port() != i.port() {
        return false;
    }
    let segments = |url: &Url| -> Vec<String> {
        url.path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
            .collect()
    };
    let (p, i) = (segments(p), segments(i));
    p.len() <= i.len() && p.iter().zip(&i).all(|(a, b)| a == b)
}

/// The text a spec carries for a canonical location: a plain path for local files (what the
/// source reader parses without decoding), the URL otherwise.
pub fn spec_text(location: &Location) -> String {
    match location.local_path() {
        Some(path) => {
            let mut text = path.display().to_string();
            if location.url().path().ends_with('/') && !text.ends_with('/') {
                text.push('/');
            }
            text
        }
        None => location.url().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> Result<String, LocationError> {
        canonical_location(text).map(|l| spec_text(&l))
    }

    #[test]
    fn encodings_and_dot_segments_resolve_to_one_path() {
        for text in [
            "/nonexistent-ns/data/x.csv",
            "/nonexistent-ns//data/./x.csv",
            "/nonexistent-ns/data/sub/../x.csv",
            "file:///nonexistent-ns/data/x.csv",
            "file://localhost/nonexistent-ns/data/x.csv",
            "FILE:///nonexistent-ns/data/x.csv",
            "file:///nonexistent-ns/data/%78.csv",
            "file:///nonexistent-ns/data/sub%2F..%2Fx.csv",
            "file:///nonexistent-ns/data/sub/%2E%2E/x.csv",
            "file:///nonexistent-ns/data/sub/%2e%2e%2fx.csv",
        ] {
            assert_eq!(
                canonical(text).as_deref(),
                Ok("/nonexistent-ns/data/x.csv"),
                "{text}"
            );
        }
        assert_eq!(
            canonical("s3://lake/raw/a%2F..%2F..%2Fsecret/x.csv").as_deref(),
            Ok("s3://lake/secret/x.csv")
        );
        assert_eq!(
            canonical("s3://lake/raw//./orders/").as_deref(),
            Ok("s3://lake/raw/orders/")
        );
    }

    #[test]
    fn what_cannot_be_read_one_way_is_refused() {
        for (text, why) in [
            ("relative/x.csv", LocationError::NotAbsolute),
            (
                "file:///data/..%252F..%252Fetc",
                LocationError::DoubleEncoded,
            ),
            ("/data/x\n.csv", LocationError::ControlCharacter),
            ("file:///data/x%0A.csv", LocationError::ControlCharacter),
        ] {
            assert_eq!(canonical(text), Err(why), "{text}");
        }
        // `..` at the root stays there, as the operating system has it.
        assert_eq!(canonical("/../../etc/passwd").as_deref(), Ok("/etc/passwd"));
        assert_eq!(
            canonical("file:///nonexistent-ns/%2E%2E/%2E%2E/%2E%2E/etc").as_deref(),
            Ok("/etc")
        );
        // A plain path is never decoded: `%` in it is a literal character of a name.
        assert_eq!(
            canonical("/nonexistent-ns/..%2F..%2Fetc").as_deref(),
            Ok("/nonexistent-ns/..%2F..%2Fetc")
        );
        assert!(matches!(
            canonical("file://otherhost/etc/passwd"),
            Err(LocationError::Malformed(_))
        ));
        assert!(matches!(
            canonical("s3:///no-bucket/x"),
            Err(LocationError::Malformed(_))
        ));
    }

    #[test]
    fn symbolic_links_are_resolved_up_to_the_first_glob() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("elsewhere/x")).unwrap();
        std::os::unix::fs::symlink(root.join("elsewhere"), root.join("link")).unwrap();
        let via_link = format!("{}/link/x/*.csv", root.display());
        assert_eq!(
            canonical(&via_link).unwrap(),
            format!("{}/elsewhere/x/*.csv", root.display())
        );
        let missing = format!("{}/link/missing/y.csv", root.display());
        assert_eq!(
            canonical(&missing).unwrap(),
            format!("{}/elsewhere/missing/y.csv", root.display())
        );
    }

    #[test]
    fn containment_is_by_whole_segments() {
        let at = |t: &str| canonical_location(t).unwrap();
        assert!(contains(&at("s3://lake/raw/"), &at("s3://lake/raw/x.csv")));
        assert!(contains(&at("s3://lake/raw/"), &at("s3://lake/raw")));
        assert!(!contains(
            &at("s3://lake/raw/"),
            &at("s3://lake/raw-private/x")
        ));
        assert!(!contains(&at("s3://lake/raw/"), &at("s3://other/raw/x")));
        assert!(!contains(&at("s3://lake/raw/"), &at("gs://lake/raw/x")));
        assert!(contains(
            &at("/nonexistent-ns/d/"),
            &at("/nonexistent-ns/d/ünï cödé/x.csv")
        ));
        assert!(!contains(
            &at("/nonexistent-ns/d/"),
            &at("/nonexistent-ns/d2/x.csv")
        ));
    }
}
