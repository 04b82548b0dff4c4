//! What a submitted pipeline may touch: the locations its sources read and the Iceberg tables
//! it reads or writes. The cluster coordinator checks every submission against its
//! [`AccessPolicy`] before anything runs, so a spec cannot read the coordinator's own files,
//! another bucket, or write into a namespace it was not given.

use std::path::Path;

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
    #[error(
        "source `{source_name}` reads {location}, which is outside the allowed locations ({allowed})"
    )]
    Location {
        source_name: String,
        location: String,
        allowed: String,
    },
    #[error("the spec at {location} is outside the allowed locations ({allowed})")]
    SpecLocation { location: String, allowed: String },
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
}

/// Allowed location prefixes and table patterns; an empty list allows everything of its kind.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Normalized URL prefixes, each ending in `/`.
    locations: Vec<String>,
    /// `namespace.table` or `namespace.*`.
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
                if !prefix.contains("://") && !prefix.starts_with('/') {
                    return Err(AccessError::BadPrefix(prefix.clone()));
                }
                let location = Location::parse(prefix, Path::new("/"))
                    .map_err(|_| AccessError::BadPrefix(prefix.clone()))?;
                Ok(format!("{}/", normalized(&location).trim_end_matches('/')))
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

    /// Checks every source location, source table, the target table and its properties.
    pub fn check(&self, spec: &ResolvedSpec) -> Result<(), AccessError> {
        for source in &spec.spec.source {
            match (&source.format, &source.table, &source.location) {
                (SourceFormat::Iceberg, Some(table), _) => self.check_table("source", table)?,
                (_, _, Some(location)) => self.check_location(&source.name, location, spec)?,
                _ => {}
            }
        }
        self.check_table("target", &spec.spec.target.table)?;
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
        Ok(())
    }

    /// Checks where a spec submitted by reference is read from.
    pub fn check_spec_location(&self, location: &Location) -> Result<(), AccessError> {
        if self.inside(location) {
            Ok(())
        } else {
            Err(AccessError::SpecLocation {
                location: location.as_url_string(),
                allowed: self.locations.join(", "),
            })
        }
    }

    fn inside(&self, location: &Location) -> bool {
        if self.locations.is_empty() {
            return true;
        }
        let url = normalized(location);
        self.locations
            .iter()
            .any(|prefix| url.starts_with(prefix.as_str()) || format!("{url}/") == *prefix)
    }

    fn check_location(
        &self,
        source_name: &str,
        text: &str,
        spec: &ResolvedSpec,
    ) -> Result<(), AccessError> {
        if self.locations.is_empty() {
            return Ok(());
        }
        let outside = || AccessError::Location {
            source_name: source_name.to_string(),
            location: text.to_string(),
            allowed: self.locations.join(", "),
        };
        let location = Location::parse(text, &spec.base_dir).map_err(|_| outside())?;
        if self.inside(&location) {
            Ok(())
        } else {
            Err(outside())
        }
    }

    fn check_table(&self, role: &'static str, table: &str) -> Result<(), AccessError> {
        if self.tables.is_empty() {
            return Ok(());
        }
        let allowed = self
            .tables
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(namespace) => table.starts_with(namespace) && table.len() > namespace.len(),
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

/// The location's URL with `.` and `..` segments resolved (re-parsing applies RFC 3986 dot
/// segment removal), so `s3://lake/raw/../secret` cannot pass as `s3://lake/raw/`.
fn normalized(location: &Location) -> String {
    let text = location.url().as_str();
    url::Url::parse(text)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| text.to_string())
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn locations_inside_the_prefixes_pass() {
        let target = "table = \"curated.daily\"";
        for location in [
            "s3://lake/raw/orders/*.parquet",
            "s3://lake/raw",
            "/data/landing/x.csv",
            "file:///data/landing/2024/",
        ] {
            assert_eq!(
                policy().check(&spec(&csv(location), target)),
                Ok(()),
                "{location}"
            );
        }
    }

    #[test]
    fn locations_outside_the_prefixes_are_refused() {
        let target = "table = \"curated.daily\"";
        for location in [
            "s3://lake/raw-private/x.csv",
            "s3://other/raw/x.csv",
            "s3://lake/raw/../secret/x.csv",
            "/etc/passwd",
            "/data/landing/../../etc/passwd",
            "relative/x.csv",
            "file:///root/.aws/credentials",
        ] {
            let err = policy()
                .check(&spec(&csv(location), target))
                .expect_err(location);
            assert!(
                err.to_string().contains("outside the allowed locations"),
                "{location}: {err}"
            );
        }
    }

    #[test]
    fn tables_and_location_properties_are_checked() {
        let ok = csv("s3://lake/raw/x.csv");
        assert!(
            policy()
                .check(&spec(&ok, "table = \"ref.countries\""))
                .is_ok()
        );
        let err = policy()
            .check(&spec(&ok, "table = \"finance.ledger\""))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "target table `finance.ledger` is outside the allowed tables (curated.*, ref.countries)"
        );
        let err = policy()
            .check(&spec(
                &ok,
                "table = \"curated.t\"\n[target.properties]\n\"write.data.path\" = \"s3://other/\"",
            ))
            .unwrap_err();
        assert!(matches!(err, AccessError::LocationProperty { .. }), "{err}");
        let iceberg = "[[source]]\nname = \"s\"\nformat = \"iceberg\"\ntable = \"hr.salaries\"\n";
        let err = policy()
            .check(&spec(iceberg, "table = \"curated.t\""))
            .unwrap_err();
        assert!(
            err.to_string().starts_with("source table `hr.salaries`"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_policy_allows_everything() {
        let any = spec(&csv("/etc/passwd"), "table = \"x.y\"");
        assert_eq!(AccessPolicy::allow_all().check(&any), Ok(()));
    }

    #[test]
    fn relative_prefixes_are_refused() {
        assert_eq!(
            AccessPolicy::new(&["data/".to_string()], &[]).unwrap_err(),
            AccessError::BadPrefix("data/".to_string())
        );
    }

    #[test]
    fn a_spec_by_reference_must_lie_under_an_allowed_location() {
        let at = |url: &str| Location::parse(url, Path::new("/")).unwrap();
        assert_eq!(
            policy().check_spec_location(&at("s3://lake/raw/pipelines/daily.toml")),
            Ok(())
        );
        let err = policy()
            .check_spec_location(&at("s3://lake/raw/../secret/daily.toml"))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the spec at s3://lake/secret/daily.toml is outside"),
            "{err}"
        );
        assert!(
            policy()
                .check_spec_location(&at("file:///etc/nightshift/coordinator.toml"))
                .is_err()
        );
    }
}
