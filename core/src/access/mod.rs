//! What a submitted pipeline may touch: the locations its sources read and the Iceberg tables
//! it reads or writes. The cluster coordinator admits every submission through its
//! [`AccessPolicy`] before anything runs, so a spec cannot read the coordinator's own files,
//! another bucket, or write into a namespace it was not given.
//!
//! One function decides whether a location is allowed, [`AccessPolicy::admit_location`]: it
//! takes the [`canonical_location`] (decoded once, dot segments resolved, local links
//! resolved) and compares it by whole segments with the allowed prefixes, canonicalized the
//! same way. [`AccessPolicy::admit`] rewrites each source of a spec to the canonical form it
//! checked, so the reader opens exactly what was allowed; for a local directory or glob it
//! also checks every file the reader would list, so a link planted inside the allowed
//! directory cannot point out of it.

mod beneath;
mod canonical;

pub use beneath::{confine_local_reads, open_local};
pub use canonical::{LocationError, canonical_location, contains, spec_text};
use nightshift_spec::{ResolvedSpec, SourceFormat};

use crate::storage::Location;

/// Table properties that would move a table's files elsewhere.
const LOCATION_PROPERTIES: &[&str] = &[
    "location",
    "write.data.path",
    "write.metadata.path",
    "write.object-storage.path",
    "write.folder-storage.path",
];

/// A submission that reaches outside what it is allowed to.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("{what} {location}{resolved}, which is outside the allowed locations ({allowed})")]
    Location {
        /// `source `orders` reads`, `the spec at`, ...
        what: String,
        location: String,
        /// ` (resolves to …)` when the canonical form differs from the text, or the file of a
        /// listing that leads out.
        resolved: String,
        allowed: String,
    },
    #[error(
        "{what} {location} is refused: {why}; it cannot be checked against the allowed locations ({allowed})"
    )]
    Unreadable {
        what: String,
        location: String,
        why: LocationError,
        allowed: String,
    },
    #[error("{role} table `{table}` is outside the allowed tables ({allowed})")]
    Table {
        role: &'static str,
        table: String,
        allowed: String,
    },
    #[error(
        "[target.properties] `{key}` would move the table's files; it is not allowed when locations are restricted"
    )]
    LocationProperty { key: String },
    #[error("allowed location `{0}` is not a URL or an absolute path")]
    BadPrefix(String),
    #[error("cannot list {location} to check the files it holds: {message}")]
    Listing { location: String, message: String },
}

/// Allowed location prefixes and table patterns; an empty list allows everything of its kind.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Canonical locations; whatever lies at or below one is allowed.
    locations: Vec<Location>,
    /// `namespace.table` or `namespace.*` (the tables directly in `namespace`).
    tables: Vec<String>,
}

impl AccessPolicy {
    /// A policy allowing everything (the embedded mode: the user runs their own files).
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// `locations`: URL prefixes (`s3://lake/raw/`, `file:///data/landing`) or absolute paths;
    /// `tables`: `ns.table` or `ns.*`.
    pub fn new(locations: &[String], tables: &[String]) -> Result<Self, AccessError> {
        let locations = locations
            .iter()
            .map(|prefix| {
                canonical_location(prefix).map_err(|_| AccessError::BadPrefix(prefix.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(AccessPolicy {
            locations,
            tables: tables.to_vec(),
        })
    }

    pub fn restricts_locations(&self) -> bool {
        !self.locations.is_empty()
    }

    /// The allowed locations on the local file system, which reads are confined to
    /// ([`confine_local_reads`]).
    pub fn local_roots(&self) -> Vec<std::path::PathBuf> {
        self.locations
            .iter()
            .filter_map(Location::local_path)
            .collect()
    }

    fn allowed_list(&self) -> String {
        self.locations
            .iter()
            .map(spec_text)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The one location check: the canonical form of `text` if it lies inside the allowed
    /// locations. `what` starts the refusal's message (`source `orders` reads`).
    pub fn admit_location(&self, what: &str, text: &str) -> Result<Location, AccessError> {
        let location = canonical_location(text).map_err(|why| AccessError::Unreadable {
            what: what.to_string(),
            location: text.to_string(),
            why,
            allowed: self.allowed_list(),
        })?;
        if self.locations.is_empty() || self.locations.iter().any(|p| contains(p, &location)) {
            return Ok(location);
        }
        let canonical = spec_text(&location);
        let resolved = if canonical.trim_end_matches('/') == text.trim_end_matches('/') {
            String::new()
        } else {
            format!(" (resolves to {canonical})")
        };
        Err(AccessError::Location {
            what: what.to_string(),
            location: text.to_string(),
            resolved,
            allowed: self.allowed_list(),
        })
    }

    /// Admits `spec`: every source location, source table, the target table and its
    /// properties. Returns the spec with each source location replaced by the canonical form
    /// that was checked (the form the readers then open).
    pub async fn admit(&self, mut spec: ResolvedSpec) -> Result<ResolvedSpec, AccessError> {
        for source in &mut spec.spec.source {
            match (&source.format, &source.table, &source.location) {
                (SourceFormat::Iceberg, Some(table), _) => self.check_table("source", table)?,
                (_, _, Some(text)) => {
                    let what = format!("source `{}` reads", source.name);
                    let location = self.admit_location(&what, text)?;
                    self.admit_listed_files(&what, text, &location).await?;
                    source.location = Some(spec_text(&location));
                }
                _ => {}
            }
        }
        self.check_table("target", &spec.spec.target.table)?;
        // Quarantined rows are written to a second table, admitted like the target.
        if spec.spec.check.iter().any(|c| c.quarantines()) {
            self.check_table(
                "rejects",
                &nightshift_spec::rejects_table(&spec.spec.target.table),
            )?;
        }
        for to in spec.spec.check.iter().filter_map(|c| c.to.as_deref()) {
            self.check_table("check", to)?;
        }
        if self.restricts_locations()
            && let Some(key) = spec
                .spec
                .target
                .properties
                .keys()
                .find(|k| LOCATION_PROPERTIES.contains(&k.to_ascii_lowercase().as_str()))
        {
            return Err(AccessError::LocationProperty { key: key.clone() });
        }
        Ok(spec)
    }

    /// For a local directory or glob under a restricting policy: every file the reader would
    /// list must open without a link leading out of its allowed location.
    async fn admit_listed_files(
        &self,
        what: &str,
        text: &str,
        location: &Location,
    ) -> Result<(), AccessError> {
        if !self.restricts_locations() {
            return Ok(());
        }
        let Some(path) = location.local_path() else {
            return Ok(());
        };
        let listing_error = |message: String| AccessError::Listing {
            location: text.to_string(),
            message,
        };
        let pattern = path.display().to_string();
        let files: Vec<std::path::PathBuf> = if pattern.contains(['*', '?', '[']) {
            glob::glob(&pattern)
                .map_err(|e| listing_error(e.to_string()))?
                .flatten()
                .collect()
        } else if path.is_dir() {
            crate::storage::list_objects(location)
                .await
                .map_err(|e| listing_error(e.to_string()))?
                .into_iter()
                .filter_map(|(file, _)| file.local_path())
                .collect()
        } else {
            return Ok(());
        };
        // The rule the readers open by (`beneath`): a file reached through a link out of its
        // allowed location is refused here, before the job is queued, as it would be later.
        let roots = self.local_roots();
        for file in files {
            if let Err(e) = beneath::open_within(&roots, &file)
                && e.kind() == std::io::ErrorKind::PermissionDenied
            {
                return Err(AccessError::Location {
                    what: what.to_string(),
                    location: text.to_string(),
                    resolved: format!(" (its file {} is a link)", file.display()),
                    allowed: self.allowed_list(),
                });
            }
        }
        Ok(())
    }

    /// `ns.*` allows the tables directly in `ns`, not those of namespaces below it.
    fn check_table(&self, role: &'static str, table: &str) -> Result<(), AccessError> {
        if self.tables.is_empty() {
            return Ok(());
        }
        let allowed = self
            .tables
            .iter()
            .any(|pattern| match pattern.strip_suffix(".*") {
                Some(namespace) => table
                    .strip_prefix(namespace)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|name| !name.is_empty() && !name.contains('.')),
                None => pattern == table,
            });
        if allowed {
            Ok(())
        } else {
            Err(AccessError::Table {
                role,
                table: table.to_string(),
                allowed: self.tables.join(", "),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn spec(sources: &str, target: &str) -> ResolvedSpec {
        let text = format!(
            "[pipeline]\nname = \"p\"\n{sources}\n[transform]\nsql = \"SELECT 1\"\n[target]\n{target}\n"
        );
        nightshift_spec::resolve_spec_text(&text, Path::new("p.toml"), Path::new("/work/job"), &[])
            .unwrap()
    }

    fn csv(location: &str) -> String {
        format!("[[source]]\nname = \"s\"\nformat = \"csv\"\nlocation = \"{location}\"\n")
    }

    fn policy() -> AccessPolicy {
        AccessPolicy::new(
            &["s3://lake/raw".to_string(), "/data/landing/".to_string()],
            &["curated.*".to_string(), "ref.countries".to_string()],
        )
        .unwrap()
    }

    async fn admit(location: &str) -> Result<String, AccessError> {
        let admitted = policy()
            .admit(spec(&csv(location), "table = \"curated.daily\""))
            .await?;
        Ok(admitted.spec.source[0].location.clone().unwrap())
    }

    #[tokio::test]
    async fn locations_inside_the_prefixes_pass_in_their_canonical_form() {
        for (location, canonical) in [
            (
                "s3://lake/raw/orders/*.parquet",
                "s3://lake/raw/orders/*.parquet",
            ),
            ("s3://lake/raw", "s3://lake/raw"),
            ("s3://lake/raw/a/..%2Fb/./x.csv", "s3://lake/raw/b/x.csv"),
            ("/data/landing/x.csv", "/data/landing/x.csv"),
            ("/data/landing//2024/../x.csv", "/data/landing/x.csv"),
            ("file:///data/landing/2024/", "/data/landing/2024/"),
        ] {
            assert_eq!(
                admit(location).await.as_deref(),
                Ok(canonical),
                "{location}"
            );
        }
    }

    #[tokio::test]
    async fn locations_outside_the_prefixes_are_refused() {
        for location in [
            "s3://lake/raw-private/x.csv",
            "s3://other/raw/x.csv",
            "s3://lake/raw/../secret/x.csv",
            "s3://lake/raw/..%2Fsecret/x.csv",
            "/etc/passwd",
            "/data/landing/../../etc/passwd",
            "file:///data/landing/..%2F..%2Fetc/passwd",
            "file:///data/landing/%2E%2E/%2E%2E/etc/passwd",
            "file:///data/landing/..%252F..%252Fetc/passwd",
            "relative/x.csv",
            "file:///root/.aws/credentials",
        ] {
            let err = admit(location).await.expect_err(location);
            assert!(
                err.to_string().contains("allowed locations"),
                "{location}: {err}"
            );
        }
        let err = admit("file:///data/landing/..%2F..%2Fetc/passwd")
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("(resolves to /etc/passwd)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tables_and_location_properties_are_checked() {
        let ok = csv("s3://lake/raw/x.csv");
        let policy = policy();
        let admit = |target: &str| policy.admit(spec(&ok, target));
        assert!(admit("table = \"ref.countries\"").await.is_ok());
        assert!(admit("table = \"curated.daily\"").await.is_ok());
        let err = admit("table = \"finance.ledger\"").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "target table `finance.ledger` is outside the allowed tables (curated.*, ref.countries)"
        );
        for nested in ["curated.sub.t", "curatedx.t"] {
            let err = admit(&format!("table = \"{nested}\""))
                .await
                .expect_err(nested);
            assert!(matches!(err, AccessError::Table { .. }), "{nested}: {err}");
        }
        let err = admit(
            "table = \"curated.t\"\n[target.properties]\n\"write.data.path\" = \"s3://other/\"",
        )
        .await
        .unwrap_err();
        assert!(matches!(err, AccessError::LocationProperty { .. }), "{err}");
        let iceberg = "[[source]]\nname = \"s\"\nformat = \"iceberg\"\ntable = \"hr.salaries\"\n";
        let err = policy
            .admit(spec(iceberg, "table = \"curated.t\""))
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("source table `hr.salaries`"),
            "{err}"
        );
        // A relationship check reads its `to` table: it is admitted like a source.
        let related = |to: &str| {
            format!(
                "table = \"curated.t\"\n[[check]]\nname = \"c\"\ntype = \"relationship\"\ncolumns = [\"x\"]\nto = \"{to}\""
            )
        };
        assert!(
            policy
                .admit(spec(&ok, &related("ref.countries")))
                .await
                .is_ok()
        );
        let err = policy
            .admit(spec(&ok, &related("hr.salaries")))
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("check table `hr.salaries`"),
            "{err}"
        );
        // A quarantining check writes `<target>__rejects`, which must be allowed too.
        let quarantine = "table = \"ref.countries\"\n[[check]]\nname = \"q\"\ntype = \"not_null\"\ncolumns = [\"x\"]\non_fail = \"quarantine\"";
        let err = admit(quarantine).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "rejects table `ref.countries__rejects` is outside the allowed tables (curated.*, ref.countries)"
        );
        assert!(
            admit(&quarantine.replace("ref.countries", "curated.t"))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn an_empty_policy_allows_everything() {
        let any = spec(&csv("/etc/passwd"), "table = \"x.y\"");
        assert!(AccessPolicy::allow_all().admit(any).await.is_ok());
    }

    #[test]
    fn relative_prefixes_are_refused() {
        assert_eq!(
            AccessPolicy::new(&["data/".to_string()], &[]).unwrap_err(),
            AccessError::BadPrefix("data/".to_string())
        );
    }

    #[tokio::test]
    async fn links_inside_the_allowed_directory_cannot_lead_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let (allowed, outside) = (root.join("allowed"), root.join("outside"));
        std::fs::create_dir_all(allowed.join("mixed")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.csv"), "a\n1\n").unwrap();
        std::fs::write(allowed.join("mixed/ok.csv"), "a\n2\n").unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("dir_link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret.csv"), allowed.join("mixed/zz.csv"))
            .unwrap();
        let policy = AccessPolicy::new(&[allowed.display().to_string()], &[]).unwrap();
        let admit = |location: String| {
            let spec = spec(&csv(&location), "table = \"t.t\"");
            let policy = policy.clone();
            async move { policy.admit(spec).await }
        };
        let a = allowed.display();
        for location in [
            format!("{a}/dir_link/secret.csv"),
            format!("{a}/dir_link/"),
            format!("{a}/mixed/"),
            format!("{a}/mixed/*.csv"),
            format!("{a}/*/secret.csv"),
        ] {
            let err = admit(location.clone()).await.expect_err(&location);
            assert!(
                err.to_string().contains("outside the allowed locations"),
                "{location}: {err}"
            );
        }
        let ok = admit(format!("{a}/mixed/ok.csv")).await.unwrap();
        assert_eq!(
            ok.spec.source[0].location.as_deref(),
            Some(format!("{a}/mixed/ok.csv").as_str())
        );
    }
}
