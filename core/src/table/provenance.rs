//! Whose rows a data file holds, when its name does not say.
//!
//! A job's data file is named after the job (`names::parse_data_file_name`), and the check
//! that a backfill value owns the partitions it overwrites (`backfill_values`) knows another
//! value's rows by that name once the commit that added them has expired. A compaction
//! rewrites a partition's files under its own name (`compact-<hex>-…`), and its snapshot names
//! no job, so after a compaction the check saw nobody's rows and let a daily value replace a
//! whole `month()` partition of other values. So a compaction writes, in each file's Parquet
//! footer (key-value metadata [`ROWS_OF_JOBS_KEY`]), the jobs whose rows the file holds: the
//! jobs its partition's input files name, and for an input that is itself a compaction's
//! file, the jobs its footer lists. Both compactions do: `maintain --compact` in one process
//! and a compaction job on a cluster (`compact-job-<hex>`, whose workers get the lists per
//! partition in [`ROWS_OF_JOBS_BY_PARTITION`]). The check reads the list from a compaction
//! file it would replace.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use iceberg::scan::FileScanTask;
use parquet::arrow::arrow_reader::ArrowReaderMetadata;
use parquet::arrow::async_reader::ParquetObjectReader;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::error::{CoreError, Result};
use crate::names;
use crate::storage::Location;

/// The Parquet footer key under which a compaction's file lists the jobs whose rows it holds
/// (a JSON array of job ids).
pub const ROWS_OF_JOBS_KEY: &str = "nightshift.rows-of-jobs";

/// The writer setting (a key of `TableOutput.parquet_properties`, which no table property
/// can be: those start with `write.parquet.`) that gives a compaction's writer, per
/// partition (its `{:?}`), the footer value of that partition's files: a JSON object.
pub const ROWS_OF_JOBS_BY_PARTITION: &str = "nightshift.rows-of-jobs-by-partition";

/// The [`ROWS_OF_JOBS_BY_PARTITION`] setting of a compaction rewriting `groups` (each one
/// partition's files): per partition, the jobs whose rows its input files hold.
pub async fn footers_of_groups(groups: &[Vec<FileScanTask>]) -> Result<String> {
    let mut by_partition = BTreeMap::new();
    for group in groups {
        let Some(partition) = group.first().and_then(|t| t.partition.as_ref()) else {
            continue;
        };
        let paths: Vec<String> = group
            .iter()
            .map(|t| t.data_file_path().to_string())
            .collect();
        let jobs = jobs_whose_rows(&paths).await?;
        by_partition.insert(format!("{partition:?}"), encode_jobs(&jobs));
    }
    Ok(serde_json::to_string(&by_partition).expect("a map of strings serializes"))
}

/// Per partition (its `{:?}`), the footer value of its files, from a writer's settings
/// (empty: not a compaction's writer).
pub fn footers_by_partition(settings: &HashMap<String, String>) -> BTreeMap<String, String> {
    settings
        .get(ROWS_OF_JOBS_BY_PARTITION)
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default()
}

/// `props` with a footer listing `jobs` (a value of [`encode_jobs`]).
pub fn with_footer(props: WriterProperties, jobs: String) -> WriterProperties {
    props
        .into_builder()
        .set_key_value_metadata(Some(vec![KeyValue::new(
            ROWS_OF_JOBS_KEY.to_string(),
            jobs,
        )]))
        .build()
}

/// Whose rows a data file holds, as far as its name tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writer {
    /// A job's file: its rows are that job's.
    Job(String),
    /// A compaction's file: its footer lists whose rows it holds.
    Compaction,
    /// Another engine's file (or a name this version does not know): no job of ours.
    Foreign,
}

/// Who wrote the file at `path`, by its name.
pub fn writer_of(path: &str) -> Writer {
    if let Some(name) = names::parse_data_file_name(path) {
        let job = name.attempt.job.as_str();
        if names::is_compaction_job(job) {
            return Writer::Compaction;
        }
        return Writer::Job(job.to_string());
    }
    let file = path.rsplit('/').next().unwrap_or(path);
    if names::is_compaction_file_name(file) {
        Writer::Compaction
    } else {
        Writer::Foreign
    }
}

/// How the check that a backfill value owns its partitions learns whose rows a file it
/// would replace holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judged {
    /// By the jobs its footer lists: a compaction's file (its snapshot names no job).
    ByFooter,
    /// By the summary of the snapshot that added it.
    BySnapshot,
    /// By the job its name carries: a job's file whose snapshot expired.
    ByName(String),
    /// Not at all: another engine's file whose snapshot expired (no job of ours).
    Not,
}

/// How a file written by `writer` is judged, `snapshot_kept` whether the snapshot that
/// added it is still in the table.
pub fn judged_by(writer: Writer, snapshot_kept: bool) -> Judged {
    match (writer, snapshot_kept) {
        (Writer::Compaction, _) => Judged::ByFooter,
        (_, true) => Judged::BySnapshot,
        (Writer::Job(job), false) => Judged::ByName(job),
        (Writer::Foreign, false) => Judged::Not,
    }
}

/// The footer value of a file holding the rows of `jobs`.
pub fn encode_jobs(jobs: &BTreeSet<String>) -> String {
    serde_json::to_string(jobs).expect("a set of strings serializes")
}

/// The jobs a footer value lists (`None`: not such a list).
pub fn decode_jobs(value: &str) -> Option<BTreeSet<String>> {
    serde_json::from_str(value).ok()
}

/// The jobs whose rows the compaction file at `path` holds, from its footer. `None`: the
/// footer lists none (a compaction by a version that did not record them).
pub async fn jobs_in_footer(path: &str) -> Result<Option<BTreeSet<String>>> {
    let unreadable =
        |e: String| CoreError::Protocol(format!("cannot read the footer of {path}: {e}"));
    let (store, object) = Location::parse(path, std::path::Path::new("/"))?.store()?;
    let mut reader = ParquetObjectReader::new(store, object);
    let meta = ArrowReaderMetadata::load_async(&mut reader, Default::default())
        .await
        .map_err(|e| unreadable(e.to_string()))?;
    let listed = meta
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .into_iter()
        .flatten()
        .find(|kv| kv.key == ROWS_OF_JOBS_KEY)
        .and_then(|kv| kv.value.as_deref());
    match listed {
        None => Ok(None),
        Some(value) => decode_jobs(value)
            .map(Some)
            .ok_or_else(|| unreadable(format!("`{ROWS_OF_JOBS_KEY}` is not a list of job ids"))),
    }
}

/// The jobs whose rows the files at `paths` hold together: each job file's job, each
/// compaction file's listed jobs (a compaction file that lists none adds nothing: it was
/// written before the lists were), no job for other engines' files.
pub async fn jobs_whose_rows(paths: &[String]) -> Result<BTreeSet<String>> {
    let mut jobs = BTreeSet::new();
    for path in paths {
        match writer_of(path) {
            Writer::Job(job) => {
                jobs.insert(job);
            }
            Writer::Compaction => jobs.extend(jobs_in_footer(path).await?.unwrap_or_default()),
            Writer::Foreign => {}
        }
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_name_says_whether_a_job_or_a_compaction_wrote_it() {
        for id in [
            "backfill-daily-from-2024-01-01",
            "compact-0123456789abcdef0123456789abcdef",
        ] {
            let attempt = names::AttemptId::new(crate::ids::JobId::parse(id).unwrap(), 2, 0, 1);
            let job = format!(
                "s3://b/t/data/month=2024-01/{}-00000.parquet",
                attempt.data_file_prefix()
            );
            assert_eq!(writer_of(&job), Writer::Job(id.to_string()), "{job}");
        }
        // A compaction run as a cluster job names its files after the job.
        let job = crate::ids::JobId::parse(&names::maintenance_id("compact-job")).unwrap();
        let attempt = names::AttemptId::new(job, 1, 3, 1);
        let path = format!(
            "/w/t/data/month=2024-01/{}-00000.parquet",
            attempt.data_file_prefix()
        );
        assert_eq!(writer_of(&path), Writer::Compaction);
        let compacted = format!(
            "/w/t/data/month=2024-01/{}-g0-00000.parquet",
            names::compaction_file_prefix()
        );
        assert_eq!(writer_of(&compacted), Writer::Compaction);
        for foreign in [
            "s3://b/t/data/00000-0-5a0c1a9e-4f7e-4d53-9a59-32ec0f0f3c43.parquet",
            "/w/t/data/compact-not-hex-g0-00000.parquet",
            "/w/t/data/compaction.parquet",
            "/w/t/data/compact-0123456789abcdef0123456789abcdef-g0-00000.avro",
            "/w/t/data/compact-0123456789abcdef0123456789ABCDEF-g0-00000.parquet",
            "/w/t/data/compact-0123456789abcdef0123456789abcdef-g-00000.parquet",
        ] {
            assert_eq!(writer_of(foreign), Writer::Foreign, "{foreign}");
        }
    }

    #[test]
    fn a_compacted_file_is_judged_by_its_footer_even_while_its_snapshot_is_kept() {
        let job = || Writer::Job("backfill-daily-from-2024-01-01".to_string());
        for kept in [true, false] {
            assert_eq!(judged_by(Writer::Compaction, kept), Judged::ByFooter);
        }
        assert_eq!(judged_by(job(), true), Judged::BySnapshot);
        assert_eq!(judged_by(Writer::Foreign, true), Judged::BySnapshot);
        assert_eq!(
            judged_by(job(), false),
            Judged::ByName("backfill-daily-from-2024-01-01".to_string())
        );
        assert_eq!(judged_by(Writer::Foreign, false), Judged::Not);
    }

    #[test]
    fn a_writer_without_the_setting_writes_no_footer_lists() {
        let mut settings = HashMap::new();
        assert!(footers_by_partition(&settings).is_empty());
        settings.insert(
            ROWS_OF_JOBS_BY_PARTITION.to_string(),
            "not json".to_string(),
        );
        assert!(footers_by_partition(&settings).is_empty());
        settings.insert(
            ROWS_OF_JOBS_BY_PARTITION.to_string(),
            r#"{"Struct { fields: [Some(Primitive(Int(648)))] }":"[\"a\"]"}"#.to_string(),
        );
        let footers = footers_by_partition(&settings);
        assert_eq!(footers.len(), 1);
        let props = with_footer(
            WriterProperties::default(),
            footers.into_values().next().unwrap(),
        );
        let listed = props.key_value_metadata().unwrap();
        assert_eq!(listed[0].key, ROWS_OF_JOBS_KEY);
        assert_eq!(
            decode_jobs(listed[0].value.as_deref().unwrap())
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn job_lists_round_trip_and_anything_else_is_not_one() {
        let jobs: BTreeSet<String> = ["backfill-daily-from-2024-01-01", "nightly-ünï-1"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(decode_jobs(&encode_jobs(&jobs)), Some(jobs));
        assert_eq!(decode_jobs("[]"), Some(BTreeSet::new()));
        assert_eq!(decode_jobs("backfill-daily"), None);
        assert_eq!(decode_jobs("{\"a\":1}"), None);
    }
}
