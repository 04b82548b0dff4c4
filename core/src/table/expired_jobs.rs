//! The jobs whose snapshots expiry removed, remembered so that a rerun of one is done and not
//! a second commit of its rows (the table's history no longer names it).
//!
//! Expiry records them in the same catalog swap that removes their snapshots, twice:
//! - [`INLINE_PROPERTY`]: the newest [`MAX_INLINE`] as `<job id>:<snapshot id>` separated by
//!   spaces, read without any I/O (each entry adds up to 150 bytes to every metadata file of
//!   the table, so it stays short);
//! - [`FILE_PROPERTY`]: the path of a text file in the table's `metadata` directory listing
//!   every expired job, oldest first, one `<job id>:<snapshot id>` per line. Each expiry
//!   writes a new file (the previous file's list, then the newly expired jobs) under a new
//!   name ([`new_file_location`]), so a file the property names is never changed. Orphan
//!   removal keeps the file the current property names, and removes earlier ones as it does
//!   any unreferenced file.
//!
//! Before the file, the inline list was all there was, and it held 100: a rerun of a job
//! expired before those appended its rows again.
//!
//! Another engine's expiry records nothing. Where the history has gaps ([`Gaps`]: a parent
//! or a sequence number gone) other than where our expiries made them ([`CUTS_PROPERTY`]),
//! or where the list the table names is gone (another engine's orphan removal deletes it:
//! no Iceberg metadata names it), a job not in the record counts as committed when a live
//! data file of the table is named after it (as every data file a job writes is): its rows
//! are still there, and a rerun would add them again.

use std::collections::{BTreeSet, HashSet};

use iceberg::table::Table;
use object_store::{ObjectStoreExt, PutPayload};
use tracing::warn;

use super::provenance::Writer;
use crate::error::{CoreError, Result};
use crate::storage::Location;

/// Table property holding the newest expired jobs, `<job id>:<snapshot id>` separated by
/// spaces, newest last.
pub const INLINE_PROPERTY: &str = "nightshift.expired-jobs";

/// The most jobs [`INLINE_PROPERTY`] holds (the newest).
pub const MAX_INLINE: usize = 20;

/// Table property naming the file that lists every expired job.
pub const FILE_PROPERTY: &str = "nightshift.expired-jobs-file";

/// Table property holding the [`Gaps`] our last expiry left ([`gaps_value`]: `p<parent id>`
/// and `s<first>-<last>` sequence ranges, separated by spaces), and `elsewhere` once gaps
/// not made by us were seen (their jobs are not in the record).
pub const CUTS_PROPERTY: &str = "nightshift.expired-cuts";

/// The word [`CUTS_PROPERTY`] holds once the history was cut by someone else.
const ELSEWHERE: &str = "elsewhere";

/// The start of the file's name, in the table's `metadata` directory.
const FILE_PREFIX: &str = "nightshift-expired-jobs-";

/// One expired job: its id and the snapshot it committed.
pub type ExpiredJob = (String, i64);

/// [`INLINE_PROPERTY`]'s new value: `existing` and then `expired`, the newest [`MAX_INLINE`]
/// kept.
pub fn inline_value(existing: Option<&str>, expired: &[ExpiredJob]) -> String {
    let mut entries: Vec<String> = existing
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    entries.extend(expired.iter().map(entry));
    let skip = entries.len().saturating_sub(MAX_INLINE);
    entries[skip..].join(" ")
}

/// The new file's contents: the previous file's entries, then those of the inline list that
/// it lacks (a table expired by a version that kept only the inline list), then `expired`;
/// each job once, in that order.
pub fn file_contents(previous: &str, inline: Option<&str>, expired: &[ExpiredJob]) -> String {
    let mut seen = HashSet::new();
    let mut out = String::new();
    let listed = previous
        .split_whitespace()
        .chain(inline.unwrap_or_default().split_whitespace())
        .map(str::to_string)
        .chain(expired.iter().map(entry));
    for line in listed {
        let job = line.rsplit_once(':').map_or(line.as_str(), |(job, _)| job);
        if seen.insert(job.to_string()) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

fn entry((job, snapshot): &ExpiredJob) -> String {
    format!("{job}:{snapshot}")
}

/// The snapshot `job` committed, if `list` (an inline value or a file's contents) names it.
/// Job ids hold no `:` or white space, so ids that share a prefix are never each other.
pub fn snapshot_in(list: &str, job: &str) -> Option<i64> {
    list.split_whitespace()
        .filter_map(|entry| entry.rsplit_once(':'))
        .find(|(id, _)| *id == job)
        .and_then(|(_, snapshot)| snapshot.parse().ok())
}

/// Where an expiry writes its new file, below the table's location `table_location`.
pub fn new_file_location(table_location: &str) -> String {
    format!(
        "{}/metadata/{FILE_PREFIX}{}.txt",
        table_location.trim_end_matches('/'),
        uuid::Uuid::new_v4().simple()
    )
}

/// The file name of the list the table's properties name, which orphan removal keeps.
pub fn current_file_name(table: &Table) -> Option<&str> {
    let path = table.metadata().properties().get(FILE_PROPERTY)?;
    Some(path.rsplit('/').next().unwrap_or(path))
}

/// The list of expired jobs a table's properties name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CurrentList {
    /// None is named (no expiry of ours listed jobs, or the store refused every list).
    Unnamed,
    /// Named, and the file is gone (another engine's orphan removal deletes it: no Iceberg
    /// metadata names it): the jobs only it held are known by their files alone.
    Gone,
    /// The file's contents.
    Read(String),
}

impl CurrentList {
    /// The list's text, empty when there is none.
    pub fn text(&self) -> &str {
        match self {
            CurrentList::Read(text) => text,
            CurrentList::Unnamed | CurrentList::Gone => "",
        }
    }
}

/// Reads the list the table's properties name; a gone one is logged.
pub async fn read_current_file(table: &Table) -> Result<CurrentList> {
    let Some(path) = table.metadata().properties().get(FILE_PROPERTY) else {
        return Ok(CurrentList::Unnamed);
    };
    let (store, key) = Location::parse(path, std::path::Path::new("/"))?.store()?;
    match store.get(&key).await {
        Ok(got) => {
            let bytes = got.bytes().await.map_err(CoreError::ObjectStore)?;
            Ok(CurrentList::Read(
                String::from_utf8_lossy(&bytes).into_owned(),
            ))
        }
        Err(object_store::Error::NotFound { .. }) => {
            warn!(
                table = %table.identifier(),
                file = %path,
                "the list of expired jobs is gone; a job older than the newest {MAX_INLINE} expired counts as committed only while its data files are in the table"
            );
            Ok(CurrentList::Gone)
        }
        Err(e) => Err(CoreError::ObjectStore(e)),
    }
}

/// Writes a list's `contents` at `path`.
pub async fn write_file(path: &str, contents: String) -> Result<()> {
    let (store, key) = Location::parse(path, std::path::Path::new("/"))?.store()?;
    store
        .put(&key, PutPayload::from(contents.into_bytes()))
        .await
        .map_err(CoreError::ObjectStore)?;
    Ok(())
}

/// The snapshot `job` committed, if expiry removed it from `table`: from the inline list,
/// else from the file, else (when the history has gaps our expiries did not make, or the
/// file is gone) the snapshot that added a live data file named after the job.
pub async fn expired_job_snapshot(table: &Table, job: &str) -> Result<Option<i64>> {
    let inline = table.metadata().properties().get(INLINE_PROPERTY);
    if let Some(snapshot) = inline.and_then(|list| snapshot_in(list, job)) {
        return Ok(Some(snapshot));
    }
    let list = read_current_file(table).await?;
    if let Some(snapshot) = snapshot_in(list.text(), job) {
        return Ok(Some(snapshot));
    }
    if list != CurrentList::Gone && !cut_elsewhere(table) {
        return Ok(None);
    }
    let Some(current) = table.metadata().current_snapshot() else {
        return Ok(None);
    };
    let live = super::live::live_entries(table, current).await?;
    Ok(live
        .iter()
        .filter(|l| l.entry.content_type() == iceberg::spec::DataContentType::Data)
        .find(|l| super::provenance::writer_of(l.entry.file_path()) == Writer::Job(job.into()))
        .map(|l| l.entry.snapshot_id().unwrap_or_default()))
}

/// Where a table's history has holes: snapshots committed on a snapshot that is gone
/// (`parents`: the ids of the gone ones; Java's expiry keeps a child's parent id, PyIceberg's
/// clears it), and the sequence numbers (from 1 to the table's last) no snapshot has
/// (`sequences`, as inclusive ranges: every commit to a format v2 table takes the next
/// number, so a missing one is a removed snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gaps {
    pub parents: BTreeSet<i64>,
    pub sequences: Vec<(i64, i64)>,
}

/// The [`Gaps`] of a history of `snapshots` (id, parent id, sequence number) whose last
/// sequence number is `last_sequence`. A format v1 table numbers nothing (all 0): only its
/// parents tell.
pub fn gaps(snapshots: &[(i64, Option<i64>, i64)], last_sequence: i64) -> Gaps {
    let ids: HashSet<i64> = snapshots.iter().map(|(id, _, _)| *id).collect();
    let parents = snapshots
        .iter()
        .filter_map(|(_, parent, _)| *parent)
        .filter(|parent| !ids.contains(parent))
        .collect();
    let mut numbers: Vec<i64> = snapshots
        .iter()
        .map(|(_, _, seq)| *seq)
        .filter(|seq| *seq > 0)
        .collect();
    numbers.sort_unstable();
    numbers.dedup();
    let mut sequences = Vec::new();
    let mut next = 1;
    for n in numbers
        .into_iter()
        .chain(std::iter::once(last_sequence + 1))
    {
        if n > next {
            sequences.push((next, n - 1));
        }
        next = next.max(n + 1);
    }
    Gaps { parents, sequences }
}

/// [`CUTS_PROPERTY`]'s value recording `gaps` as ours (`p<id>`, `s<first>-<last>`), and
/// `elsewhere` when the table already had gaps not ours.
pub fn gaps_value(gaps: &Gaps, elsewhere: bool) -> String {
    let parents = gaps.parents.iter().map(|p| format!("p{p}"));
    let sequences = gaps.sequences.iter().map(|(a, b)| format!("s{a}-{b}"));
    let mut words: Vec<String> = parents.chain(sequences).collect();
    if elsewhere {
        words.push(ELSEWHERE.to_string());
    }
    words.join(" ")
}

/// Whether `now` has a gap that `recorded` (a [`CUTS_PROPERTY`] value, from our last
/// expiry) does not hold, or `recorded` says there was one. A gap that grew since (another
/// engine expired a snapshot beside ours) is held by no recorded range.
pub fn gaps_elsewhere(recorded: Option<&str>, now: &Gaps) -> bool {
    let words: Vec<&str> = recorded.unwrap_or_default().split_whitespace().collect();
    let parents: HashSet<i64> = words
        .iter()
        .filter_map(|w| w.strip_prefix('p')?.parse().ok())
        .collect();
    let ranges: Vec<(i64, i64)> = words
        .iter()
        .filter_map(|w| {
            let (a, b) = w.strip_prefix('s')?.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    words.contains(&ELSEWHERE)
        || now.parents.iter().any(|p| !parents.contains(p))
        || now
            .sequences
            .iter()
            .any(|(a, b)| !ranges.iter().any(|(c, d)| c <= a && b <= d))
}

fn table_gaps(table: &Table, without: &[i64]) -> Gaps {
    let snapshots: Vec<(i64, Option<i64>, i64)> = table
        .metadata()
        .snapshots()
        .filter(|s| !without.contains(&s.snapshot_id()))
        .map(|s| (s.snapshot_id(), s.parent_snapshot_id(), s.sequence_number()))
        .collect();
    gaps(&snapshots, table.metadata().last_sequence_number())
}

/// Whether `table`'s history has gaps no expiry of ours made.
pub fn cut_elsewhere(table: &Table) -> bool {
    let recorded = table.metadata().properties().get(CUTS_PROPERTY);
    gaps_elsewhere(recorded.map(String::as_str), &table_gaps(table, &[]))
}

/// Whether an expiry that wrote its new list (`written`) or not, over `previous`, leaves
/// expired jobs in no list: the store refused the new list, or the previous one was gone
/// (its jobs are not in the new one). Their gaps then count as not ours, so a rerun of one
/// of those jobs looks for its files.
pub fn loses_jobs(written: bool, previous: &CurrentList) -> bool {
    !written || *previous == CurrentList::Gone
}

/// The [`CUTS_PROPERTY`] value an expiry of `doomed` on `table` sets; `lost`: it left jobs
/// in no list ([`loses_jobs`]).
pub fn cuts_after_expiry(table: &Table, doomed: &[i64], lost: bool) -> String {
    gaps_value(&table_gaps(table, doomed), lost || cut_elsewhere(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(range: std::ops::Range<i64>) -> Vec<ExpiredJob> {
        range.map(|i| (format!("job-{i}"), i)).collect()
    }

    #[test]
    fn the_inline_list_keeps_the_newest_up_to_its_bound() {
        let value = inline_value(None, &[("a".into(), 1), ("backfill-p-d-1".into(), 2)]);
        assert_eq!(value, "a:1 backfill-p-d-1:2");
        assert_eq!(snapshot_in(&value, "a"), Some(1));
        assert_eq!(snapshot_in(&value, "backfill-p-d-1"), Some(2));
        // Ids that share a prefix are not each other.
        assert_eq!(snapshot_in(&value, "backfill-p-d"), None);
        assert_eq!(snapshot_in(&value, "backfill-p-d-10"), None);

        let value = inline_value(Some(&value), &jobs(0..MAX_INLINE as i64));
        assert_eq!(value.split(' ').count(), MAX_INLINE);
        assert_eq!(snapshot_in(&value, "a"), None, "the oldest went");
        assert_eq!(snapshot_in(&value, "job-0"), Some(0));
    }

    #[test]
    fn the_file_keeps_every_expired_job_once_oldest_first() {
        let first = file_contents("", None, &jobs(0..3));
        assert_eq!(first, "job-0:0\njob-1:1\njob-2:2\n");
        // Far past the inline bound: the file forgets none.
        let many = file_contents(&first, None, &jobs(3..1000));
        assert_eq!(many.lines().count(), 1000);
        for job in ["job-0", "job-1", "job-999"] {
            assert!(snapshot_in(&many, job).is_some(), "{job}");
        }
        assert_eq!(snapshot_in(&many, "job-1000"), None);
        // The inline list is a copy of the newest; it adds nothing twice.
        let inline = inline_value(None, &jobs(990..1000));
        let again = file_contents(&many, Some(&inline), &jobs(1000..1001));
        assert_eq!(again.lines().count(), 1001);
        assert_eq!(again.lines().last(), Some("job-1000:1000"));
    }

    #[test]
    fn a_table_expired_before_the_file_keeps_its_inline_jobs_in_the_first_file() {
        // An earlier version kept up to 100 inline and no file.
        let first = file_contents("", Some("old-a:7 old-b:8"), &jobs(0..1));
        assert_eq!(first, "old-a:7\nold-b:8\njob-0:0\n");
    }

    #[test]
    fn gaps_in_the_history_are_found_by_parent_and_by_sequence_number() {
        // 1 <- 2 <- 3, and 2 <- 4 (a branch), numbered 1 to 4.
        let whole = [
            (1, None, 1),
            (2, Some(1), 2),
            (3, Some(2), 3),
            (4, Some(2), 4),
        ];
        assert_eq!(gaps(&whole, 4), Gaps::default());
        // 1 and 2 gone, their children keeping their parent ids (Java's expiry).
        let java = gaps(&[(3, Some(2), 3), (4, Some(2), 4)], 4);
        assert_eq!(java.parents, BTreeSet::from([2]));
        assert_eq!(java.sequences, vec![(1, 2)]);
        // The same, the ids cleared (PyIceberg's expiry): the numbers still tell.
        let pyiceberg = gaps(&[(3, None, 3), (4, None, 4)], 4);
        assert!(pyiceberg.parents.is_empty());
        assert_eq!(pyiceberg.sequences, vec![(1, 2)]);
        // Holes in the middle and at the end (the newest snapshot removed after a rollback).
        let holes = gaps(&[(1, None, 1), (4, Some(3), 4)], 6);
        assert_eq!(holes.sequences, vec![(2, 3), (5, 6)]);
        // Format v1 numbers nothing.
        assert_eq!(gaps(&[(1, None, 0), (2, Some(1), 0)], 0), Gaps::default());
    }

    #[test]
    fn only_gaps_our_expiry_recorded_are_ours() {
        let ours = gaps(&[(3, Some(2), 3), (4, Some(3), 4)], 4);
        let recorded = gaps_value(&ours, false);
        assert_eq!(recorded, "p2 s1-2");
        assert!(!gaps_elsewhere(Some(&recorded), &ours));
        assert!(!gaps_elsewhere(None, &Gaps::default()));
        assert!(gaps_elsewhere(None, &ours), "a gap and no record");
        // New snapshots after our expiry leave no new gap.
        let later = gaps(&[(3, Some(2), 3), (4, Some(3), 4), (5, Some(4), 5)], 5);
        assert!(!gaps_elsewhere(Some(&recorded), &later));
        // Another engine then removed 3 (clearing 4's parent id): our gap grew.
        let theirs = gaps(&[(4, None, 4), (5, Some(4), 5)], 5);
        assert_eq!(theirs.sequences, vec![(1, 3)]);
        assert!(gaps_elsewhere(Some(&recorded), &theirs));
        // ... or kept the parent id: a parent we did not record.
        assert!(gaps_elsewhere(
            Some(&recorded),
            &gaps(&[(4, Some(3), 4)], 4)
        ));
        // Ids that share digits are not each other.
        let one = gaps(&[(5, Some(2), 5)], 5);
        assert!(gaps_elsewhere(Some("p21 s1-4"), &one));
        // Once seen, gaps not ours stay known through our later expiries: the jobs they
        // took are in no record.
        let sticky = gaps_value(&one, true);
        assert!(sticky.ends_with("elsewhere"));
        assert!(gaps_elsewhere(Some(&sticky), &one));
    }

    #[test]
    fn jobs_in_no_list_leave_their_gaps_unexplained() {
        let read = CurrentList::Read("a:1\n".into());
        assert!(!loses_jobs(true, &read));
        assert!(!loses_jobs(true, &CurrentList::Unnamed));
        // The store refused the new list, or the previous one is gone.
        assert!(loses_jobs(false, &read));
        assert!(loses_jobs(true, &CurrentList::Gone));
        assert_eq!(CurrentList::Gone.text(), "");
        assert_eq!(read.text(), "a:1\n");
        // Such an expiry's gaps are recorded as seen elsewhere, for good.
        let ours = gaps(&[(3, Some(2), 3)], 3);
        let recorded = gaps_value(&ours, loses_jobs(false, &read));
        assert!(gaps_elsewhere(Some(&recorded), &ours));
    }

    #[test]
    fn each_expiry_writes_a_new_file_in_the_tables_metadata() {
        let a = new_file_location("s3://bucket/wh/db/t/");
        let b = new_file_location("s3://bucket/wh/db/t");
        assert_ne!(a, b);
        for path in [&a, &b] {
            assert!(
                path.starts_with("s3://bucket/wh/db/t/metadata/nightshift-expired-jobs-"),
                "{path}"
            );
            assert!(path.ends_with(".txt"), "{path}");
            assert!(
                super::super::files::is_table_file(
                    "/wh/db/t",
                    path.strip_prefix("s3://bucket").unwrap()
                ),
                "{path}"
            );
        }
    }
}
