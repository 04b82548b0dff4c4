//! Every object name the engine writes, built and parsed in one place.
//!
//! - a job's scratch directory: `<scratch>/<job>/`;
//! - a shuffle object: `<scratch>/<job>/stage-<s>/map-<p>/attempt-<a>-<nonce>/data.arrow`;
//! - a data file: `<table>/data/[<partition path>/]<job>-s<s>-p<p>-a<a>-<nonce>-<nnnnn>.parquet`
//!   (the `-<nnnnn>.parquet` tail is added by iceberg-rust's file name generator);
//! - our overwrite snapshot's manifests: `<table>/metadata/<uuid>-m<n>.avro` and
//!   `<table>/metadata/snap-<snapshot>-0-<uuid>.avro`, as iceberg-rust names its own.
//!
//! Cleanup decides what is whose by parsing these names back, never by comparing prefixes:
//! job ids are chosen by callers and one may be a prefix of another (`etl`, `etl-sales`), or
//! even contain a whole name tail (`x-s1-p0-a1-00c0ffee`). A data file name is parsed from the
//! right, where its shape is fixed, so the job id is everything before that tail.

use std::fmt;

use crate::ids::JobId;

/// Length of the random part that makes an attempt's paths unique.
const NONCE_LEN: usize = 8;

/// A fresh random nonce (8 lowercase hex digits).
pub fn new_nonce() -> String {
    let mut nonce = uuid::Uuid::new_v4().simple().to_string();
    nonce.truncate(NONCE_LEN);
    nonce
}

fn is_nonce(s: &str) -> bool {
    is_lower_hex(s, NONCE_LEN)
}

/// Whether `s` is `len` lowercase hex digits (a nonce, or a maintenance id's uuid).
fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Hex digits in a maintenance id (`uuid::Uuid::simple`).
const MAINTENANCE_HEX_LEN: usize = 32;

/// Digits only, no sign, no leading `+`, fits a `u32`.
fn parse_number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Which task attempt wrote an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AttemptId {
    pub job: JobId,
    pub stage: u32,
    pub partition: u32,
    pub attempt: u32,
    /// Random, so two runs of one attempt number (a duplicate delivery) never share a path.
    pub nonce: String,
}

impl AttemptId {
    pub fn new(job: JobId, stage: u32, partition: u32, attempt: u32) -> Self {
        AttemptId {
            job,
            stage,
            partition,
            attempt,
            nonce: new_nonce(),
        }
    }

    /// The prefix handed to the data-file writer: `<job>-s<s>-p<p>-a<a>-<nonce>`.
    pub fn data_file_prefix(&self) -> String {
        format!(
            "{}-s{}-p{}-a{}-{}",
            self.job, self.stage, self.partition, self.attempt, self.nonce
        )
    }

    /// The attempt's directory relative to the job's stage directory:
    /// `map-<p>/attempt-<a>-<nonce>`.
    pub fn shuffle_dir(&self) -> String {
        format!(
            "map-{}/attempt-{}-{}",
            self.partition, self.attempt, self.nonce
        )
    }
}

/// A data file name written by the engine, parsed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFileName {
    pub attempt: AttemptId,
    /// The writer's file counter within the attempt.
    pub sequence: u32,
}

impl fmt::Display for DataFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{:05}.parquet",
            self.attempt.data_file_prefix(),
            self.sequence
        )
    }
}

/// Parses the last path segment of a data file (a bare name or a whole path/URL). `None` for
/// anything the engine did not name, which cleanup then never touches.
pub fn parse_data_file_name(path: &str) -> Option<DataFileName> {
    let name = path.rsplit('/').next()?;
    let stem = name.strip_suffix(".parquet")?;
    // From the right: <job>-s<s>-p<p>-a<a>-<nonce>-<seq>.
    let mut parts = stem.rsplitn(6, '-');
    let sequence = parse_number(parts.next()?)?;
    let nonce = parts.next()?;
    let attempt = parse_number(parts.next()?.strip_prefix('a')?)?;
    let partition = parse_number(parts.next()?.strip_prefix('p')?)?;
    let stage = parse_number(parts.next()?.strip_prefix('s')?)?;
    let job = JobId::parse(parts.next()?).ok()?;
    if !is_nonce(nonce) {
        return None;
    }
    Some(DataFileName {
        attempt: AttemptId {
            job,
            stage,
            partition,
            attempt,
            nonce: nonce.to_string(),
        },
        sequence,
    })
}

/// The id a compaction writes its files under, `compact-<32 hex digits>` (its files are
/// `compact-<hex>-g<n>-<nnnnn>.parquet`): unique, and never parsed as a job's data file by
/// [`parse_data_file_name`], so no job's cleanup claims a file of a compaction in flight.
pub fn compaction_file_prefix() -> String {
    maintenance_id("compact")
}

/// Whether `file` (a bare file name) is one a compaction wrote:
/// `compact-<32 hex digits>-g<n>-<nnnnn>.parquet`.
pub fn is_compaction_file_name(file: &str) -> bool {
    let Some(rest) = file
        .strip_suffix(".parquet")
        .and_then(|stem| stem.strip_prefix("compact-"))
    else {
        return false;
    };
    let Some((hex, rest)) = rest.split_at_checked(MAINTENANCE_HEX_LEN) else {
        return false;
    };
    let Some((group, sequence)) = rest.strip_prefix("-g").and_then(|r| r.split_once('-')) else {
        return false;
    };
    is_lower_hex(hex, MAINTENANCE_HEX_LEN)
        && parse_number(group).is_some()
        && parse_number(sequence).is_some()
}

/// Whether `job` is the id of a compaction run as a cluster job (`compact-job-<32 hex>`,
/// `maintain --cluster --compact`): its files are named after it like a job's, and hold
/// the rows of the jobs whose files it rewrote.
pub fn is_compaction_job(job: &str) -> bool {
    job.strip_prefix("compact-job-")
        .is_some_and(|hex| is_lower_hex(hex, MAINTENANCE_HEX_LEN))
}

/// The job id a maintenance commit is tagged with (`<kind>-<32 hex digits>`), by which a
/// commit whose answer was lost is found in the history.
pub fn maintenance_id(kind: &str) -> String {
    format!("{kind}-{}", uuid::Uuid::new_v4().simple())
}

/// The name of a job's scratch directory below the scratch root: the job id itself, which
/// [`JobId::parse`] keeps to one safe path segment (no `/`, not `.` or `..`).
pub fn job_scratch_dir(job: &JobId) -> &str {
    job.as_str()
}

/// A stage's shuffle directory relative to the scratch root: `<job>/stage-<s>`.
pub fn stage_scratch_dir(job: &JobId, stage: u32) -> String {
    format!("{}/stage-{stage}", job_scratch_dir(job))
}

/// The object a map task attempt writes in its directory.
pub const SHUFFLE_OBJECT: &str = "data.arrow";

/// A shuffle object path relative to the scratch root, parsed back.
pub fn parse_shuffle_path(relative: &str) -> Option<AttemptId> {
    let mut parts = relative.trim_start_matches('/').split('/');
    let job = JobId::parse(parts.next()?).ok()?;
    let stage = parse_number(parts.next()?.strip_prefix("stage-")?)?;
    let partition = parse_number(parts.next()?.strip_prefix("map-")?)?;
    let (attempt, nonce) = parts.next()?.strip_prefix("attempt-")?.split_once('-')?;
    let attempt = parse_number(attempt)?;
    if parts.next()? != SHUFFLE_OBJECT || parts.next().is_some() || !is_nonce(nonce) {
        return None;
    }
    Some(AttemptId {
        job,
        stage,
        partition,
        attempt,
        nonce: nonce.to_string(),
    })
}

/// The job whose scratch directory holds `relative` (a path below the scratch root).
pub fn scratch_owner(relative: &str) -> Option<JobId> {
    let first = relative.trim_start_matches('/').split('/').next()?;
    JobId::parse(first).ok()
}

/// Path of manifest number `n` of our snapshot with commit id `commit_uuid`, below the
/// table's metadata directory (the shape iceberg-rust gives its own manifests).
pub fn manifest_path(table_location: &str, commit_uuid: &uuid::Uuid, n: usize) -> String {
    format!("{table_location}/metadata/{commit_uuid}-m{n}.avro")
}

/// Path of the manifest list of snapshot `snapshot_id` with commit id `commit_uuid`.
pub fn manifest_list_path(
    table_location: &str,
    snapshot_id: i64,
    commit_uuid: &uuid::Uuid,
) -> String {
    format!("{table_location}/metadata/snap-{snapshot_id}-0-{commit_uuid}.avro")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> JobId {
        JobId::parse(id).unwrap()
    }

    fn data_file(id: &str, stage: u32, partition: u32, attempt: u32, seq: u32) -> DataFileName {
        DataFileName {
            attempt: AttemptId::new(job(id), stage, partition, attempt),
            sequence: seq,
        }
    }

    #[test]
    fn compaction_files_are_no_jobs() {
        for _ in 0..100 {
            let prefix = compaction_file_prefix();
            assert!(JobId::parse(&prefix).is_ok(), "{prefix}");
            for group in [0, 7, 12345] {
                let name = format!("data/day=2024-01-01/{prefix}-g{group}-00000.parquet");
                assert_eq!(parse_data_file_name(&name), None, "{name}");
                let file = name.rsplit('/').next().unwrap();
                assert!(is_compaction_file_name(file), "{file}");
            }
        }
    }

    #[test]
    fn data_file_names_round_trip() {
        for id in [
            "etl",
            "etl-sales-2024",
            "x-s1-p0-a1-00c0ffee",
            "x-s1-p0-a1-00c0ffee-00000.parquet",
            "a.b_c",
            "01a20f8d-c847-77df-abf6-458b03f1bf1d",
            "-s1",
            "s1-p0",
            "9",
        ] {
            for (stage, partition, attempt, seq) in [
                (1, 0, 1, 0),
                (12, 255, 3, 99_999),
                (u32::MAX, u32::MAX, u32::MAX, 100_000),
            ] {
                let name = data_file(id, stage, partition, attempt, seq);
                let text = name.to_string();
                assert_eq!(parse_data_file_name(&text), Some(name.clone()), "{text}");
                let path = format!("/w/ns/t/data/day=2024-01-01/{text}");
                assert_eq!(parse_data_file_name(&path), Some(name), "{path}");
            }
        }
    }

    #[test]
    fn ids_that_are_prefixes_of_each_other_parse_apart() {
        let long = data_file("etl-sales-2024", 1, 0, 1, 0).to_string();
        let short = data_file("etl", 1, 0, 1, 0).to_string();
        assert!(
            long.starts_with("etl-s"),
            "the old prefix match would take it: {long}"
        );
        assert_eq!(
            parse_data_file_name(&long).unwrap().attempt.job,
            job("etl-sales-2024")
        );
        assert_eq!(
            parse_data_file_name(&short).unwrap().attempt.job,
            job("etl")
        );
        let tricky = data_file("etl-s1-p0-a1-deadbeef", 2, 3, 4, 5).to_string();
        let parsed = parse_data_file_name(&tricky).unwrap();
        assert_eq!(parsed.attempt.job, job("etl-s1-p0-a1-deadbeef"));
        assert_eq!((parsed.attempt.stage, parsed.attempt.partition), (2, 3));
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for name in [
            "00000-0-1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718-00001.parquet", // Spark
            "data.parquet",
            "etl-s1-p0-a1-deadbeef-00000.avro",
            "etl-s1-p0-a1-DEADBEEF-00000.parquet",
            "etl-s1-p0-a1-deadbee-00000.parquet",
            "etl-s1-p0-a-deadbeef-00000.parquet",
            "etl-s1-p0-a+1-deadbeef-00000.parquet",
            "etl-s1-p-1-a1-deadbeef-00000.parquet",
            "-s1-p0-a1-deadbeef-00000.parquet",
            "..-s1-p0-a1-deadbeef-00000.parquet",
            ".-s1-p0-a1-deadbeef-00000.parquet",
            "etl-s99999999999-p0-a1-deadbeef-00000.parquet",
            "s1-p0-a1-deadbeef-00000.parquet",
            "",
        ] {
            assert_eq!(parse_data_file_name(name), None, "{name}");
        }
    }

    #[test]
    fn shuffle_paths_round_trip() {
        for id in ["etl", "etl-sales", "x-s1-p0", "a.b"] {
            let attempt = AttemptId::new(job(id), 3, 7, 2);
            let path = format!(
                "{}/{}/{SHUFFLE_OBJECT}",
                stage_scratch_dir(&attempt.job, 3),
                attempt.shuffle_dir()
            );
            assert_eq!(parse_shuffle_path(&path), Some(attempt.clone()), "{path}");
            assert_eq!(scratch_owner(&path), Some(job(id)));
        }
        assert_eq!(
            parse_shuffle_path("etl/stage-1/map-0/attempt-1-deadbeef/x.arrow"),
            None
        );
        assert_eq!(
            parse_shuffle_path("../stage-1/map-0/attempt-1-deadbeef/data.arrow"),
            None
        );
        assert_eq!(scratch_owner(".."), None);
        assert_eq!(scratch_owner("."), None);
    }
}
