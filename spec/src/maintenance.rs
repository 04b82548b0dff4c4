//! `[maintenance]`: the upkeep of the pipeline's target table that `nightshift maintain
//! --spec` runs, kept in version control with the pipeline instead of in a scheduler's flags.
//!
//! ```toml
//! [maintenance]
//! drop_partitions_older_than = "400d"   # partitions whose time range ended before
//! compact = true                        # small files rewritten per partition
//! target_file_size_bytes = 134217728    # compaction's target (default: the table's)
//! min_input_files = 2
//! expire_older_than = "7d"              # snapshots, keeping the newest keep_last
//! keep_last = 10
//! remove_orphans_older_than = "3d"      # files no snapshot references
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::SpecError;

/// `[maintenance]`; every policy is off unless set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceSection {
    /// Drop the partitions whose time range ended longer ago than this (`400d`).
    #[serde(default)]
    pub drop_partitions_older_than: Option<String>,
    /// Rewrite each partition's small data files into files near the target size.
    #[serde(default)]
    pub compact: bool,
    /// Compaction's target file size in bytes (default: the table's
    /// `write.target-file-size-bytes`, else 512 MiB).
    #[serde(default)]
    pub target_file_size_bytes: Option<u64>,
    /// Small files a partition needs before compaction rewrites it (default 2).
    #[serde(default)]
    pub min_input_files: Option<usize>,
    /// Expire snapshots created longer ago than this (`7d`, `12h`).
    #[serde(default)]
    pub expire_older_than: Option<String>,
    /// Newest snapshots kept whatever their age (default 1; the current one always is).
    #[serde(default)]
    pub keep_last: Option<usize>,
    /// Remove files no snapshot references, older than this (`3d`).
    #[serde(default)]
    pub remove_orphans_older_than: Option<String>,
}

impl MaintenanceSection {
    /// True when no policy is set.
    pub fn is_empty(&self) -> bool {
        self.drop_partitions_older_than.is_none()
            && !self.compact
            && self.expire_older_than.is_none()
            && self.remove_orphans_older_than.is_none()
    }

    /// `drop_partitions_older_than` as a duration (checked when the spec loads).
    pub fn drop_partitions_age(&self) -> Option<Duration> {
        self.drop_partitions_older_than.as_deref().and_then(age)
    }

    /// `expire_older_than` as a duration.
    pub fn expire_age(&self) -> Option<Duration> {
        self.expire_older_than.as_deref().and_then(age)
    }

    /// `remove_orphans_older_than` as a duration.
    pub fn orphans_age(&self) -> Option<Duration> {
        self.remove_orphans_older_than.as_deref().and_then(age)
    }
}

/// An age as people write it (`7d`, `12h`, `90m`, `3days`).
fn age(text: &str) -> Option<Duration> {
    humantime::parse_duration(text.trim()).ok()
}

/// Every age of `[maintenance]` readable, and nothing set that needs another key.
pub(crate) fn check_maintenance(
    section: &MaintenanceSection,
    path: &Path,
) -> Result<(), SpecError> {
    for (key, value) in [
        (
            "drop_partitions_older_than",
            &section.drop_partitions_older_than,
        ),
        ("expire_older_than", &section.expire_older_than),
        (
            "remove_orphans_older_than",
            &section.remove_orphans_older_than,
        ),
    ] {
        if let Some(text) = value
            && age(text).is_none()
        {
            return Err(SpecError::invalid(
                path,
                format!(
                    "[maintenance] {key} = \"{text}\" is not an age: write e.g. \"7d\", \"12h\" or \"90m\""
                ),
            ));
        }
    }
    let compaction_key = [
        (
            "target_file_size_bytes",
            section.target_file_size_bytes.is_some(),
        ),
        ("min_input_files", section.min_input_files.is_some()),
    ]
    .into_iter()
    .find(|(_, set)| *set);
    if let Some((key, _)) = compaction_key
        && !section.compact
    {
        return Err(SpecError::invalid(
            path,
            format!("[maintenance] {key} tunes compaction: add compact = true"),
        ));
    }
    if section.keep_last.is_some() && section.expire_older_than.is_none() {
        return Err(SpecError::invalid(
            path,
            "[maintenance] keep_last belongs to snapshot expiry: add expire_older_than = \"7d\"",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> MaintenanceSection {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn ages_read_as_people_write_them() {
        let s = section(
            "drop_partitions_older_than = \"400d\"\nexpire_older_than = \"12h\"\nkeep_last = 3\nremove_orphans_older_than = \"90m\"\ncompact = true\nmin_input_files = 4",
        );
        assert!(check_maintenance(&s, Path::new("p.toml")).is_ok());
        assert_eq!(
            s.drop_partitions_age(),
            Some(Duration::from_secs(400 * 86_400))
        );
        assert_eq!(s.expire_age(), Some(Duration::from_secs(12 * 3_600)));
        assert_eq!(s.orphans_age(), Some(Duration::from_secs(90 * 60)));
        assert!(!s.is_empty());
        assert!(MaintenanceSection::default().is_empty());
    }

    #[test]
    fn what_cannot_work_is_refused_naming_the_key() {
        for (text, says) in [
            (
                "expire_older_than = \"a week\"",
                "expire_older_than = \"a week\" is not an age",
            ),
            ("min_input_files = 3", "min_input_files tunes compaction"),
            ("keep_last = 3", "keep_last belongs to snapshot expiry"),
        ] {
            let err = check_maintenance(&section(text), Path::new("p.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
