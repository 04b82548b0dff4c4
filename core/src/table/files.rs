//! Which files under a table's location are the table's own, and where its data files go.
//!
//! Catalogs place a table at `<warehouse>/<namespace levels>/<table>`, so one table's
//! directory can hold another's: `a.b.c` (namespace `a.b`) lives in `a/b/c`, inside `a.b`'s
//! `a/b`, and `ns.t.data` in `ns/t/data`, inside `ns.t`'s data directory. Everything that
//! lists a table's location to delete files ([`is_table_file`]) keeps to the table's own
//! layout: `metadata/<file>`, and `data/<file>` or `data/<field>=<value>/.../<file>`. A
//! nested table's files always lie below a `metadata` or `data` segment of its own, which
//! has no `=`, so they never match.
//!
//! That holds only while a partition value cannot add path segments: a string value such as
//! `../../x` written raw would put a data file outside the table (and outside the
//! warehouse). [`PartitionPathGenerator`] escapes names and values as Iceberg's Java
//! `PartitionSpec.partitionToPath` does (URL encoding), where iceberg-rust 0.10's
//! `DefaultLocationGenerator` writes them raw.

use iceberg::spec::PartitionKey;
use iceberg::writer::file_writer::location_generator::LocationGenerator;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// What Java's `URLEncoder` leaves as it is: letters, digits and `.-*_` (space becomes `+`).
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'*')
    .remove(b'_')
    .remove(b' ');

/// `text` as one path segment: no `/`, `\`, `%` or other reserved character left raw.
pub fn escape_path_segment(text: &str) -> String {
    utf8_percent_encode(text, PATH_SEGMENT)
        .to_string()
        .replace(' ', "+")
}

/// The partition directory of `key`: `<field>=<value>` per field, each escaped.
pub fn partition_path(key: &PartitionKey) -> String {
    let Ok(partition_type) = key.spec().partition_type(key.schema()) else {
        // Not expected for a key the writer built from the same spec and schema. Escaping
        // iceberg-rust's own path whole keeps the file inside the data directory, in one
        // segment without a raw `=`: `is_table_file` does not count it as the table's, so
        // at worst cleanup leaves it behind; it never lands outside the table.
        return escape_path_segment(&key.to_path());
    };
    key.spec()
        .fields()
        .iter()
        .zip(partition_type.fields())
        .enumerate()
        .map(|(i, (field, field_type))| {
            let value = field
                .transform
                .to_human_string(&field_type.field_type, key.data()[i].as_ref());
            bounded_segment(format!(
                "{}={}",
                escape_path_segment(&field.name),
                escape_path_segment(&value)
            ))
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The longest partition directory name written whole. File systems take at most 255 bytes
/// in a name; a long text value escaped (a 48-character Chinese address is 432 bytes) failed
/// the task with "File name too long".
const MAX_SEGMENT_BYTES: usize = 200;

/// How much of an over-long directory name is kept before its digest.
const KEPT_SEGMENT_BYTES: usize = 160;

/// `segment` (an escaped `<field>=<value>`) as a directory name of at most
/// [`MAX_SEGMENT_BYTES`]: a longer one keeps its first bytes and ends in `~` and 16 hex
/// digits of its SHA-256, so two values sharing a long prefix stay apart. Escaping never
/// leaves a raw `~`, so a shortened name is never another value's whole one. Readers take
/// partition values from the manifests, never from paths.
fn bounded_segment(segment: String) -> String {
    use sha2::{Digest, Sha256};
    if segment.len() <= MAX_SEGMENT_BYTES {
        return segment;
    }
    // The escaped text is ASCII; do not cut inside a `%XX` escape.
    let mut cut = KEPT_SEGMENT_BYTES;
    while let Some(p) = segment[..cut].rfind('%').filter(|p| p + 3 > cut) {
        cut = p;
    }
    let digest = Sha256::digest(segment.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}~{hex}", &segment[..cut])
}

/// Places data files at `<data location>/<partition_path>/<file>`.
#[derive(Clone, Debug)]
pub struct PartitionPathGenerator {
    data_location: String,
}

impl PartitionPathGenerator {
    pub fn new(data_location: String) -> Self {
        PartitionPathGenerator {
            data_location: data_location.trim_end_matches('/').to_string(),
        }
    }
}

impl LocationGenerator for PartitionPathGenerator {
    fn generate_location(&self, partition_key: Option<&PartitionKey>, file_name: &str) -> String {
        match partition_key {
            Some(key) if !PartitionKey::is_effectively_none(Some(key)) => {
                format!("{}/{}/{file_name}", self.data_location, partition_path(key))
            }
            _ => format!("{}/{file_name}", self.data_location),
        }
    }
}

/// Whether `path`, found by listing below the table location `root` (both as the same kind
/// of string: URL paths, or plain paths), is a file of that table's own layout. Anything
/// else below the location — another table nested in it, a user's files — is not the
/// table's to delete.
pub fn is_table_file(root: &str, path: &str) -> bool {
    let root = root.trim_end_matches('/');
    let Some(rest) = path.strip_prefix(root).and_then(|r| r.strip_prefix('/')) else {
        return false;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        ["metadata", file] => !file.is_empty(),
        ["data", dirs @ .., file] => {
            !file.is_empty() && dirs.iter().all(|d| d.contains('=') && *d != "=")
        }
        _ => false,
    }
}

/// Deletes the files of the table at `root` ([`is_table_file`]), and, for a local table, the
/// directories that are left empty; another table's files below `root` stay. Returns how
/// many files it deleted.
///
/// Only for a table that has just been dropped with no snapshot (the failed first run's
/// `drop_if_empty` checks both, and that no other job's data file is in it): no snapshot of
/// it can reference anything, and a file any other table's snapshot references lies below
/// that table's own `metadata` or `data` segment, which [`is_table_file`] never matches.
pub async fn delete_table_files(root: &crate::storage::Location) -> crate::Result<usize> {
    let files: Vec<crate::storage::Location> = crate::storage::list_objects(root)
        .await?
        .into_iter()
        .map(|(location, _)| location)
        .filter(|location| is_table_file(root.url().path(), location.url().path()))
        .collect();
    crate::storage::delete_objects(&files).await?;
    if let Some(dir) = root.local_path() {
        remove_empty_dirs(&dir);
    }
    Ok(files.len())
}

/// Removes `dir` and the directories below it that hold nothing (after their own empty
/// directories are gone). Best effort: what cannot be read or removed stays.
fn remove_empty_dirs(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    // Fails, harmlessly, when anything is left in it.
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;
    use iceberg::spec::{
        Literal, NestedField, PartitionSpec, PrimitiveType, Schema, Struct, Transform, Type,
    };
    use std::sync::Arc;

    #[test]
    fn a_tables_own_files_are_its_metadata_and_its_data_in_partition_directories() {
        let root = "/wh/ns/t";
        for own in [
            "/wh/ns/t/metadata/00001-x.metadata.json",
            "/wh/ns/t/metadata/snap-1.avro",
            "/wh/ns/t/data/job-s1-p0-a1-x-00000.parquet",
            "/wh/ns/t/data/day=2024-01-01/f.parquet",
            "/wh/ns/t/data/k=a%2Fb/n=1/f.parquet",
        ] {
            assert!(is_table_file(root, own), "{own}");
        }
        for foreign in [
            // `ns.t.data` (namespace `ns.t`): inside `ns.t`'s data directory.
            "/wh/ns/t/data/data/job-s1-p0-a1-x-00000.parquet",
            "/wh/ns/t/data/metadata/00001-x.metadata.json",
            "/wh/ns/t/data/data/k=1/f.parquet",
            // `ns.t.c`, and a table `k=1` of namespace `ns.t.data`.
            "/wh/ns/t/c/metadata/00001-x.metadata.json",
            "/wh/ns/t/c/data/f.parquet",
            "/wh/ns/t/data/k=1/metadata/00001-x.metadata.json",
            "/wh/ns/t/data/k=1/data/f.parquet",
            // Tables whose names share the prefix, and stray files.
            "/wh/ns/t2/data/f.parquet",
            "/wh/ns/t_c/metadata/v1.metadata.json",
            "/wh/ns/t/notes.txt",
            "/wh/ns/t/metadata/sub/x.json",
            "/wh/ns/t/data/",
        ] {
            assert!(!is_table_file(root, foreign), "{foreign}");
        }
        assert!(is_table_file("/wh/ns/t/", "/wh/ns/t/data/f.parquet"));
    }

    fn key(values: Vec<Option<Literal>>) -> PartitionKey {
        let schema = Arc::new(
            Schema::builder()
                .with_fields(vec![
                    NestedField::optional(1, "k", Type::Primitive(PrimitiveType::String)).into(),
                    NestedField::optional(2, "ts", Type::Primitive(PrimitiveType::Date)).into(),
                ])
                .build()
                .unwrap(),
        );
        let spec = PartitionSpec::builder(schema.clone())
            .add_partition_field("k", "k", Transform::Identity)
            .unwrap()
            .add_partition_field("ts", "ts_day", Transform::Day)
            .unwrap()
            .build()
            .unwrap();
        PartitionKey::new(spec, schema, Struct::from_iter(values))
    }

    #[test]
    fn partition_values_cannot_add_path_segments() {
        let generator = PartitionPathGenerator::new("/wh/p/t/data/".into());
        let day = Some(Literal::date(19_723));
        let at = |value: &str| {
            generator.generate_location(
                Some(&key(vec![Some(Literal::string(value)), day.clone()])),
                "f.parquet",
            )
        };
        assert_eq!(
            at("../../../../etc/x"),
            "/wh/p/t/data/k=..%2F..%2F..%2F..%2Fetc%2Fx/ts_day=2024-01-01/f.parquet"
        );
        assert_eq!(
            at("a/b"),
            "/wh/p/t/data/k=a%2Fb/ts_day=2024-01-01/f.parquet"
        );
        assert_eq!(
            at("50%"),
            "/wh/p/t/data/k=50%25/ts_day=2024-01-01/f.parquet"
        );
        assert_eq!(
            at("x=y z"),
            "/wh/p/t/data/k=x%3Dy+z/ts_day=2024-01-01/f.parquet"
        );
        assert_eq!(at("é"), "/wh/p/t/data/k=%C3%A9/ts_day=2024-01-01/f.parquet");
        assert_eq!(at(".."), "/wh/p/t/data/k=../ts_day=2024-01-01/f.parquet");
        assert_eq!(
            generator.generate_location(Some(&key(vec![None, None])), "f.parquet"),
            "/wh/p/t/data/k=null/ts_day=null/f.parquet"
        );
        for value in ["../../../../etc/x", "a/b", "x=y z", "é", ".."] {
            assert!(is_table_file("/wh/p/t", &at(value)), "{value}");
        }
        assert_eq!(
            generator.generate_location(None, "f.parquet"),
            "/wh/p/t/data/f.parquet"
        );
    }

    #[test]
    fn a_long_value_makes_a_short_directory_name_of_its_own() {
        let generator = PartitionPathGenerator::new("/wh/p/t/data".into());
        let day = Some(Literal::date(19_723));
        let segment = |value: &str| {
            let location = generator.generate_location(
                Some(&key(vec![Some(Literal::string(value)), day.clone()])),
                "f.parquet",
            );
            location
                .strip_prefix("/wh/p/t/data/")
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_string()
        };
        // 54 characters of an address: 470 bytes escaped, where a name holds 255.
        let address = "北京市朝阳区建国门外大街一号国贸大厦A座写字楼二十八层".repeat(2);
        let long = segment(&address);
        assert!(long.len() <= MAX_SEGMENT_BYTES, "{long}");
        assert!(long.starts_with("k=%E5%8C%97%E4%BA%AC"), "{long}");
        // Cut between escapes, never inside one, and then the digest.
        let (kept, digest) = long.rsplit_once('~').unwrap();
        assert_eq!(digest.len(), 16);
        assert!(
            !kept.ends_with('%') && kept.rsplit('%').next().unwrap().len() >= 2,
            "{kept}"
        );
        // Two values that share the kept prefix are two directories.
        assert_ne!(
            segment(&format!("{address}x")),
            segment(&format!("{address}y"))
        );
        assert_eq!(segment(&address), long);
        // A value that fits is written whole, as before.
        assert_eq!(segment("short"), "k=short");
        let exactly = "a".repeat(MAX_SEGMENT_BYTES - 2);
        assert_eq!(segment(&exactly), format!("k={exactly}"));
        assert_ne!(segment(&format!("{exactly}a")), format!("k={exactly}a"));
        assert!(is_table_file(
            "/wh/p/t",
            &format!("/wh/p/t/data/{long}/ts_day=2024-01-01/f.parquet")
        ));
    }
}
