//! Table maintenance: expiring old snapshots and removing orphan files.
//!
//! Both delete files, so both ask [`TableReferences`]: expiry deletes only files that the
//! expired snapshots referenced and no remaining snapshot reads; orphan removal deletes only
//! files of the table's own layout that no snapshot reads, that no metadata file in the
//! table's log is, and that are older than a safety age (a job still writing its files has
//! not committed them yet). "Reads" is [`TableReferences::load_live`]: a file an overwrite
//! or a compaction replaced is named by the replacing snapshot's `DELETED` entry only, so it
//! goes once the snapshots that read it have expired.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use iceberg::spec::TableMetadata;
use iceberg::{Catalog, TableIdent, TableRequirement, TableUpdate};
use tracing::{info, warn};

use super::catalog::CatalogConfig;
use super::expired_jobs;
use super::references::TableReferences;
use super::swap::{SwapError, swap_table_metadata};
use crate::error::{CoreError, Result};
use crate::storage::{Location, delete_objects, list_objects_meta};

/// Which snapshots expire.
#[derive(Debug, Clone, Copy)]
pub struct ExpirePolicy {
    /// Snapshots created longer ago than this expire...
    pub older_than: Duration,
    /// ...except the newest `keep_last` (at least 1: the current snapshot never expires).
    pub keep_last: usize,
}

/// The snapshots `policy` expires at `now_ms` on `table`: older than the cut-off, not among
/// the newest `keep_last`, not the current snapshot, not the head of any branch or tag, and
/// not one an incremental pipeline needs to find where it stands
/// ([`crate::incremental::kept_for_consumed_records`]).
pub fn snapshots_to_expire(
    table: &iceberg::table::Table,
    now_ms: i64,
    policy: ExpirePolicy,
) -> Vec<i64> {
    let metadata = table.metadata();
    let snapshots: Vec<(i64, i64)> = metadata
        .snapshots()
        .map(|s| (s.timestamp_ms(), s.snapshot_id()))
        .collect();
    let mut protected = referenced_by_refs(metadata);
    let history = super::commit::current_history(table);
    let records = crate::incremental::kept_for_consumed_records(
        history
            .iter()
            .map(|s| (s.snapshot_id(), &s.summary().additional_properties)),
    );
    if let Some(oldest) = records.last() {
        info!(
            snapshots = records.len(),
            oldest, "kept for the consumed records of incremental pipelines"
        );
    }
    protected.extend(records);
    choose_expired(&snapshots, &protected, now_ms, policy)
}

/// [`snapshots_to_expire`] on plain data: `snapshots` as (created at ms, id).
fn choose_expired(
    snapshots: &[(i64, i64)],
    protected: &HashSet<i64>,
    now_ms: i64,
    policy: ExpirePolicy,
) -> Vec<i64> {
    let cutoff = now_ms - policy.older_than.as_millis() as i64;
    let mut snapshots = snapshots.to_vec();
    snapshots.sort_unstable_by(|a, b| b.cmp(a)); // newest first
    let mut expired: Vec<i64> = snapshots
        .into_iter()
        .skip(policy.keep_last.max(1))
        .filter(|(at, id)| *at < cutoff && !protected.contains(id))
        .map(|(_, id)| id)
        .collect();
    expired.sort_unstable();
    expired
}

/// Snapshot ids at the head of a branch or tag (`main` included).
fn referenced_by_refs(metadata: &TableMetadata) -> HashSet<i64> {
    let mut ids: HashSet<i64> = metadata.current_snapshot_id().into_iter().collect();
    if let Ok(json) = serde_json::to_value(metadata)
        && let Some(refs) = json.get("refs").and_then(|r| r.as_object())
    {
        ids.extend(
            refs.values()
                .filter_map(|r| r.get("snapshot-id").and_then(|id| id.as_i64())),
        );
    }
    ids
}

/// Expired jobs (job id, snapshot id) ordered by when their snapshots were committed,
/// `(sequence number, created at ms)`, oldest first, as [`expired_jobs::inline_value`]
/// keeps the newest. The table's snapshots come in no order: expiring more than the bound at once
/// forgot jobs at random, whose reruns then appended their rows again.
fn oldest_first(mut jobs: Vec<((i64, i64), String, i64)>) -> Vec<(String, i64)> {
    jobs.sort_unstable();
    jobs.into_iter()
        .map(|(_, job, snapshot)| (job, snapshot))
        .collect()
}

/// What an expiry did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expired {
    pub snapshots: Vec<i64>,
    /// Files only the expired snapshots referenced, deleted.
    pub files_deleted: usize,
}

/// Expires the snapshots `policy` names in one catalog swap, then deletes the files only
/// they referenced. A conflicting commit makes it reload and decide again.
pub async fn expire_snapshots(
    catalog: &dyn Catalog,
    config: &CatalogConfig,
    ident: &TableIdent,
    policy: ExpirePolicy,
    dry_run: bool,
) -> Result<Expired> {
    for _attempt in 0..8 {
        let table = catalog.load_table(ident).await?;
        let doomed = snapshots_to_expire(&table, now_ms(), policy);
        if doomed.is_empty() || dry_run {
            return Ok(Expired {
                snapshots: doomed,
                files_deleted: 0,
            });
        }
        let before = TableReferences::load(&table).await?;
        let mut requirements = vec![TableRequirement::UuidMatch {
            uuid: table.metadata().uuid(),
        }];
        if let Some(current) = table.metadata().current_snapshot_id() {
            requirements.push(TableRequirement::RefSnapshotIdMatch {
                r#ref: iceberg::spec::MAIN_BRANCH.to_string(),
                snapshot_id: Some(current),
            });
        }
        // The jobs of the expired snapshots stay known in the same swap: their reruns
        // are done, not appended again.
        let expired_jobs = oldest_first(
            table
                .metadata()
                .snapshots()
                .filter(|s| doomed.contains(&s.snapshot_id()))
                .filter_map(|s| {
                    let job = s
                        .summary()
                        .additional_properties
                        .get(super::JOB_ID_PROPERTY)?;
                    Some((
                        (s.sequence_number(), s.timestamp_ms()),
                        job.clone(),
                        s.snapshot_id(),
                    ))
                })
                .collect(),
        );
        let mut updates = vec![TableUpdate::RemoveSnapshots {
            snapshot_ids: doomed.clone(),
        }];
        let lost = !expired_jobs.is_empty() && {
            let (update, lost) = remember_expired_jobs(&table, &expired_jobs).await?;
            updates.push(update);
            lost
        };
        updates.push(TableUpdate::SetProperties {
            updates: [(
                expired_jobs::CUTS_PROPERTY.to_string(),
                expired_jobs::cuts_after_expiry(&table, &doomed, lost),
            )]
            .into(),
        });
        match swap_table_metadata(config, &table, updates, requirements).await {
            Ok(()) => {
                let after = TableReferences::load_live(&catalog.load_table(ident).await?).await?;
                let unreferenced: Vec<Location> = before
                    .paths()
                    .filter(|path| !after.references(path))
                    .map(|path| Location::parse(path, std::path::Path::new("/")))
                    .collect::<Result<_>>()?;
                delete_objects(&unreferenced).await?;
                info!(table = %ident, snapshots = doomed.len(), files = unreferenced.len(), "expired snapshots");
                return Ok(Expired {
                    snapshots: doomed,
                    files_deleted: unreferenced.len(),
                });
            }
            Err(SwapError::Conflict(message) | SwapError::Unknown(message)) => {
                warn!(table = %ident, %message, "expiry met another commit; deciding again");
            }
            Err(SwapError::Failed(e)) => return Err(e),
        }
    }
    Err(CoreError::Target {
        table: ident.to_string(),
        message: "snapshot expiry kept conflicting with other commits".into(),
    })
}

/// The update that records `expired` (oldest first) as [`expired_jobs`] describes: a new
/// file listing every expired job, written before the swap that names it (if the swap
/// fails, the file is an orphan), and the inline list of the newest; and whether jobs are
/// in no list ([`expired_jobs::loses_jobs`]). A store that refuses the file (an S3 table
/// bucket takes only Iceberg's own objects in a table's metadata) gets the inline list
/// alone, and the property keeps naming the last list written.
async fn remember_expired_jobs(
    table: &iceberg::table::Table,
    expired: &[expired_jobs::ExpiredJob],
) -> Result<(TableUpdate, bool)> {
    let inline = table
        .metadata()
        .properties()
        .get(expired_jobs::INLINE_PROPERTY)
        .map(String::as_str);
    let previous = expired_jobs::read_current_file(table).await?;
    let file = expired_jobs::new_file_location(table.metadata().location());
    let written = expired_jobs::write_file(
        &file,
        expired_jobs::file_contents(previous.text(), inline, expired),
    )
    .await;
    let mut updates = vec![(
        expired_jobs::INLINE_PROPERTY.to_string(),
        expired_jobs::inline_value(inline, expired),
    )];
    let lost = expired_jobs::loses_jobs(written.is_ok(), &previous);
    match written {
        Ok(()) => updates.push((expired_jobs::FILE_PROPERTY.to_string(), file)),
        Err(e) => {
            warn!(
                table = %table.identifier(),
                error = %e,
                "cannot write the list of expired jobs; the newest {} stay in the table's properties, and a rerun of an older one looks for its files in the table",
                expired_jobs::MAX_INLINE
            );
        }
    }
    Ok((
        TableUpdate::SetProperties {
            updates: updates.into_iter().collect(),
        },
        lost,
    ))
}

/// Files of `table`'s own layout ([`super::files::is_table_file`]: not another table's nested
/// in its directory, nor anything else beside its `metadata` and `data`) that no snapshot
/// reads, that are not a metadata file of the table's log, and that were last written
/// before `older_than` ago.
pub async fn find_orphans(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    older_than: Duration,
) -> Result<Vec<Location>> {
    let listed_table = catalog.load_table(ident).await?;
    let root = Location::parse(
        listed_table.metadata().location(),
        std::path::Path::new("/"),
    )?;
    // The table is read again after the listing: a file committed meanwhile is referenced.
    let listed = list_objects_meta(&root).await?;
    let table = catalog.load_table(ident).await?;
    let metadata = table.metadata();
    let references = TableReferences::load_live(&table).await?;
    let mut metadata_files: BTreeSet<String> = metadata
        .metadata_log()
        .iter()
        .map(|m| file_name(&m.metadata_file).to_string())
        .collect();
    if let Some(current) = table.metadata_location() {
        metadata_files.insert(file_name(current).to_string());
    }
    let cutoff = std::time::SystemTime::now() - older_than;
    let current = table.metadata_location().map(file_name).unwrap_or_default();
    let expired_jobs_file = expired_jobs::current_file_name(&table);
    let mut orphans = Vec::new();
    for (location, meta) in listed {
        let path = location.url().path().to_string();
        if !super::files::is_table_file(root.url().path(), &path) {
            continue;
        }
        let name = file_name(&path);
        if !metadata_files.contains(name) && is_newer_metadata(name, current) {
            return Err(CoreError::Target {
                table: ident.to_string(),
                message: format!(
                    "the table's location holds {path}, a metadata file newer than the one this catalog has ({current}): another catalog (a copy or a restore of this one) commits to the same files, and what it committed would look orphaned from here. Nothing was deleted; remove orphans through the catalog that writes the table (if none does, a writer died between writing that file and its commit: delete that one file and run again)"
                ),
            });
        }
        let modified: std::time::SystemTime = meta.last_modified.into();
        let kept = references.references(&path)
            || metadata_files.contains(name)
            || name == "version-hint.text"
            || Some(name) == expired_jobs_file
            || modified >= cutoff;
        if !kept {
            orphans.push(location);
        }
    }
    Ok(orphans)
}

/// The youngest files orphan removal may consider: a job's files are unreferenced until
/// its commit, so a shorter age deletes the files of jobs still running, and they would
/// fail or, before the commit checked its files, publish a snapshot missing them. Spark's
/// `remove_orphan_files` refuses less than a day for the same reason.
pub const MIN_ORPHAN_AGE: Duration = Duration::from_secs(24 * 3600);

/// Refuses an orphan age below [`MIN_ORPHAN_AGE`] for `table`.
pub fn check_orphan_age(table: &str, older_than: Duration) -> Result<()> {
    if older_than < MIN_ORPHAN_AGE {
        return Err(CoreError::Target {
            table: table.to_string(),
            message: format!(
                "orphan removal needs an age of at least 1d (got {}): younger unreferenced files may belong to a job still running",
                humantime::format_duration(older_than)
            ),
        });
    }
    Ok(())
}

/// Deletes [`find_orphans`] of `ident`; returns what it deleted (or would, with `dry_run`).
/// `older_than` is at least [`MIN_ORPHAN_AGE`].
pub async fn remove_orphans(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    older_than: Duration,
    dry_run: bool,
) -> Result<Vec<String>> {
    check_orphan_age(&ident.to_string(), older_than)?;
    let orphans = find_orphans(catalog, ident, older_than).await?;
    if !dry_run {
        delete_objects(&orphans).await?;
        info!(table = %ident, files = orphans.len(), "removed orphan files");
    }
    Ok(orphans.iter().map(|l| l.to_string()).collect())
}

/// Whether `name` is a table metadata file (`<version>-<uuid>.metadata.json`) of a higher
/// version than `current`, the catalog's: a copy or restore of the catalog points at the
/// same location as the catalog still committing to it, and orphan removal through the
/// stale one deleted the other's newer data, manifests and metadata (its table unreadable).
fn is_newer_metadata(name: &str, current: &str) -> bool {
    let version = |name: &str| -> Option<u64> {
        let stem = name.strip_suffix(".metadata.json")?;
        stem.split_once('-')?.0.parse().ok()
    };
    matches!((version(name), version(current)), (Some(found), Some(ours)) if found > ours)
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn expired_jobs_are_ordered_by_commit_so_the_newest_are_remembered() {
        // 30 jobs expired at once, in the order a hash map gives them.
        let mut jobs: Vec<((i64, i64), String, i64)> = (1..=30)
            .map(|n| ((n, 1_000 + n), format!("job-{n}"), 7_000 + n))
            .collect();
        jobs.sort_by_key(|(_, job, _)| job.chars().rev().collect::<String>());
        let ordered = oldest_first(jobs);
        assert_eq!(ordered[0], ("job-1".to_string(), 7_001));
        let value = expired_jobs::inline_value(None, &ordered);
        assert_eq!(expired_jobs::MAX_INLINE, 20);
        assert_eq!(expired_jobs::snapshot_in(&value, "job-30"), Some(7_030));
        assert_eq!(expired_jobs::snapshot_in(&value, "job-11"), Some(7_011));
        assert_eq!(expired_jobs::snapshot_in(&value, "job-10"), None);
        // The file lists them all, in the order they were committed.
        let file = expired_jobs::file_contents("", None, &ordered);
        assert_eq!(file.lines().count(), 30);
        assert_eq!(file.lines().next(), Some("job-1:7001"));
        assert_eq!(file.lines().last(), Some("job-30:7030"));
        // Equal sequence numbers (format v1) fall back on the time.
        let v1 = oldest_first(vec![
            ((0, 9), "late".into(), 2),
            ((0, 3), "early".into(), 1),
        ]);
        assert_eq!(v1[0].0, "early");
    }

    #[test]
    fn a_metadata_file_newer_than_the_catalogs_is_another_writers() {
        let ours = "00007-5c1e0000-0000-0000-0000-000000000000.metadata.json";
        assert!(is_newer_metadata(
            "00008-9a2b0000-0000-0000-0000-000000000000.metadata.json",
            ours
        ));
        assert!(is_newer_metadata("00100-x.metadata.json", ours));
        assert!(!is_newer_metadata("00007-other.metadata.json", ours));
        assert!(!is_newer_metadata("00003-old.metadata.json", ours));
        // Data files, manifests and names of another form say nothing.
        assert!(!is_newer_metadata("00009-0-abc.parquet", ours));
        assert!(!is_newer_metadata("snap-1-1-abc.avro", ours));
        assert!(!is_newer_metadata("v9.metadata.json", ours));
        assert!(!is_newer_metadata(
            "00009-x.metadata.json",
            "v3.metadata.json"
        ));
    }

    #[test]
    fn orphan_removal_needs_an_age_of_a_day() {
        for young in [0, 59, 3_600, 86_399] {
            let err = check_orphan_age("ns.t", Duration::from_secs(young))
                .unwrap_err()
                .to_string();
            assert!(err.contains("at least 1d"), "{err}");
            assert!(err.contains("ns.t"), "{err}");
        }
        assert!(
            check_orphan_age("ns.t", Duration::from_secs(5_400))
                .unwrap_err()
                .to_string()
                .contains("got 1h 30m")
        );
        assert!(check_orphan_age("ns.t", MIN_ORPHAN_AGE).is_ok());
        assert!(check_orphan_age("ns.t", Duration::from_secs(3 * 86_400)).is_ok());
    }

    fn policy(days: u64, keep_last: usize) -> ExpirePolicy {
        ExpirePolicy {
            older_than: Duration::from_secs(days * 86_400),
            keep_last,
        }
    }

    #[test]
    fn old_snapshots_expire_but_the_newest_and_the_referenced_stay() {
        // Ten daily snapshots, ids 0..10, the newest created at day 10.
        let snapshots: Vec<(i64, i64)> = (0..10).map(|d| (d * DAY, d)).collect();
        let now = 10 * DAY;
        let none = HashSet::new();
        assert_eq!(
            choose_expired(&snapshots, &none, now, policy(7, 1)),
            vec![0, 1, 2]
        );
        assert_eq!(
            choose_expired(&snapshots, &none, now, policy(7, 8)),
            vec![0, 1]
        );
        assert_eq!(
            choose_expired(&snapshots, &none, now, policy(0, 1)),
            (0..9).collect::<Vec<_>>()
        );
        // keep_last 0 still keeps the newest.
        assert_eq!(
            choose_expired(&snapshots, &none, now, policy(0, 0)).len(),
            9
        );
        let tagged: HashSet<i64> = [1].into();
        assert_eq!(
            choose_expired(&snapshots, &tagged, now, policy(7, 1)),
            vec![0, 2]
        );
        assert!(choose_expired(&[], &none, now, policy(0, 1)).is_empty());
    }
}
