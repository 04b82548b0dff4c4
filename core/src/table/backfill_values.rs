//! A backfill's values must each own the partitions they overwrite.
//!
//! `nightshift backfill` runs one job per value of a parameter, and with
//! `mode = "overwrite_partitions"` each job replaces the partitions its rows fall in. When the
//! partitions are coarser than the values (a daily backfill into `month(ts)` or `bucket`
//! partitions), each value replaced the one before it, and only the last value's rows stayed,
//! with every job reported committed. So a backfill value's commit that would remove rows
//! committed by another value of a backfill of the same pipeline is refused
//! ([`replaces_another_value`]). A redo of the same value (a new `--run-id`) replaces its own
//! rows, as meant; a run that is not a backfill's is not judged (a nightly job may recompute
//! a month to date on purpose).

use std::collections::HashMap;

use super::commit::{JOB_ID_PROPERTY, PIPELINE_PROPERTY};

/// How every job id `nightshift backfill` gives its values begins.
pub const BACKFILL_JOB_PREFIX: &str = "backfill-";
const PARAM_PREFIX: &str = "nightshift.param.";

/// `raw` with the characters a job id cannot hold replaced by `_`, as a backfill value's
/// job id is made (`backfill-<pipeline>[-<run>]-<key>-<value>`).
pub fn job_id_text(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The parameter a backfill value's job ranges over: the one whose `-<key>-<value>` ends its
/// job id (`None` when none does, e.g. not a backfill's job).
fn backfill_key(summary: &HashMap<String, String>) -> Option<&str> {
    let job = summary.get(JOB_ID_PROPERTY)?;
    summary.iter().find_map(|(key, value)| {
        let name = key.strip_prefix(PARAM_PREFIX)?;
        job.ends_with(&job_id_text(&format!("-{name}-{value}")))
            .then_some(name)
    })
}

/// Whether the commit whose summary is `ours` is a backfill value's (its job id is one
/// `nightshift backfill` gives).
pub fn is_backfill_value(ours: &HashMap<String, String>) -> bool {
    ours.get(JOB_ID_PROPERTY)
        .is_some_and(|job| job.starts_with(BACKFILL_JOB_PREFIX))
}

/// The job ids a backfill value's job `job` had under the pipeline's `previous` names (its
/// id names the pipeline): a backfill resumed after a rename finds the values committed
/// before it by these.
pub fn under_previous_names(job: &str, name: &str, previous: &[String]) -> Vec<String> {
    let ours = job_id_text(&format!("{BACKFILL_JOB_PREFIX}{name}-"));
    let Some(rest) = job.strip_prefix(&ours) else {
        return Vec::new();
    };
    previous
        .iter()
        .map(|old| job_id_text(&format!("{BACKFILL_JOB_PREFIX}{old}-{rest}")))
        .collect()
}

/// Another backfill value whose rows a commit would replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherValue {
    /// The parameters that differ, as `key=value`, ours and theirs.
    pub ours: String,
    pub theirs: String,
    /// The job that committed the other value.
    pub job: String,
}

/// Whether the commit whose summary is `ours` must not remove rows added by the commit
/// whose summary is `theirs`: both are values of backfills of one pipeline, and a parameter
/// both were given differs. `None`: it may.
pub fn replaces_another_value(
    ours: &HashMap<String, String>,
    theirs: &HashMap<String, String>,
) -> Option<OtherValue> {
    let backfill_job = |summary: &HashMap<String, String>| {
        summary
            .get(JOB_ID_PROPERTY)
            .filter(|job| job.starts_with(BACKFILL_JOB_PREFIX))
            .cloned()
    };
    let (_, job) = (backfill_job(ours)?, backfill_job(theirs)?);
    let their_pipeline = theirs.get(PIPELINE_PROPERTY)?;
    if !crate::incremental::pipeline_names(ours).contains(&their_pipeline.as_str()) {
        return None;
    }
    // The value is the ranged parameter's: a redo whose other parameters changed (the fix)
    // replaces its own value's rows.
    let key = backfill_key(ours);
    let mut differing: Vec<(&str, &String, &String)> = ours
        .iter()
        .filter_map(|(k, value)| {
            let name = k.strip_prefix(PARAM_PREFIX)?;
            if key.is_some_and(|key| key != name) {
                return None;
            }
            let other = theirs.get(k)?;
            (other != value).then_some((name, value, other))
        })
        .collect();
    if differing.is_empty() {
        return None;
    }
    differing.sort();
    let shown = |pick: fn(&(&str, &String, &String)) -> String| {
        differing.iter().map(pick).collect::<Vec<_>>().join(" ")
    };
    Some(OtherValue {
        ours: shown(|(name, ours, _)| format!("{name}={ours}")),
        theirs: shown(|(name, _, theirs)| format!("{name}={theirs}")),
        job,
    })
}

/// [`replaces_another_value`] for a file whose commit expired: judged by the job id its name
/// carries (`their_job`). A backfill value's job id ends with `-<key>-<value>`, so a file of
/// a backfill job of the pipeline (under one of its names) whose id does not end with ours
/// is another value's. Without it, expiry of the snapshot that added a value's file let
/// another value replace its partitions.
pub fn replaces_another_values_file(
    ours: &HashMap<String, String>,
    their_job: &str,
) -> Option<OtherValue> {
    if !is_backfill_value(ours) {
        return None;
    }
    let key = backfill_key(ours)?;
    let value = ours.get(&format!("{PARAM_PREFIX}{key}"))?;
    let of_the_pipeline = crate::incremental::pipeline_names(ours)
        .iter()
        .any(|name| their_job.starts_with(&job_id_text(&format!("{BACKFILL_JOB_PREFIX}{name}-"))));
    let same_value = their_job.ends_with(&job_id_text(&format!("-{key}-{value}")));
    // Their value as their job id spells it (`_` for what an id cannot hold).
    let theirs = their_job
        .rsplit_once(&job_id_text(&format!("-{key}-")))
        .map_or("?", |(_, value)| value);
    (of_the_pipeline && !same_value).then(|| OtherValue {
        ours: format!("{key}={value}"),
        theirs: format!("{key}={theirs}"),
        job: their_job.to_string(),
    })
}

/// The refusal of a backfill value's `overwrite_partitions` commit that would replace
/// `other`'s rows (see [`replaces_another_value`]).
pub fn refusal(other: &OtherValue) -> String {
    format!(
        "backfill value {} would replace rows committed by value {} (job {}) of a backfill of the same pipeline: mode = \"overwrite_partitions\" replaces whole partitions, and these partitions hold more than one value's rows (a daily backfill into month() or bucket() partitions), so only the last value's rows would stay. Partition the table so each value owns its partitions (day(ts) for a daily backfill), or use mode = \"merge\" with merge_keys. Nothing was committed",
        other.ours, other.theirs, other.job
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(job: &str, pipeline: &str, params: &[(&str, &str)]) -> HashMap<String, String> {
        let mut s = HashMap::from([
            (JOB_ID_PROPERTY.to_string(), job.to_string()),
            (PIPELINE_PROPERTY.to_string(), pipeline.to_string()),
        ]);
        for (k, v) in params {
            s.insert(format!("{PARAM_PREFIX}{k}"), v.to_string());
        }
        s
    }

    #[test]
    fn a_value_committed_under_a_previous_name_is_found_by_its_old_id() {
        let previous = ["daily revenue".to_string(), "old".to_string()];
        assert_eq!(
            under_previous_names(
                "backfill-new_name-run_date-2024-01-01",
                "new name",
                &previous
            ),
            [
                "backfill-daily_revenue-run_date-2024-01-01",
                "backfill-old-run_date-2024-01-01"
            ]
        );
        assert!(under_previous_names("nightly-1", "new name", &previous).is_empty());
        assert!(under_previous_names("backfill-other-d-1", "new name", &previous).is_empty());
    }

    #[test]
    fn a_file_whose_commit_expired_is_judged_by_the_job_its_name_carries() {
        let day2 = summary("backfill-p-d-2024-01-02", "p", &[("d", "2024-01-02")]);
        let other = replaces_another_values_file(&day2, "backfill-p-d-2024-01-01").unwrap();
        assert_eq!(
            (
                other.ours.as_str(),
                other.theirs.as_str(),
                other.job.as_str()
            ),
            ("d=2024-01-02", "d=2024-01-01", "backfill-p-d-2024-01-01")
        );
        // A redo's file, or the first run's file of the value a redo replaces, is its own.
        assert_eq!(
            replaces_another_values_file(&day2, "backfill-p-fix-d-2024-01-02"),
            None
        );
        let redo = summary("backfill-p-fix-d-2024-01-02", "p", &[("d", "2024-01-02")]);
        assert_eq!(
            replaces_another_values_file(&redo, "backfill-p-d-2024-01-02"),
            None
        );
        assert!(replaces_another_values_file(&redo, "backfill-p-d-2024-01-03").is_some());
        // Values spelled with characters an id cannot hold compare as the id spells them.
        let spaced = summary("backfill-p-d-a_b", "p", &[("d", "a b")]);
        assert_eq!(
            replaces_another_values_file(&spaced, "backfill-p-d-a_b"),
            None
        );
        // Under a name the pipeline had before, a value is its own pipeline's.
        let mut renamed = summary("backfill-q-d-2024-01-02", "q", &[("d", "2024-01-02")]);
        renamed.insert(
            crate::incremental::PREVIOUS_NAMES_PROPERTY.into(),
            "p".into(),
        );
        assert!(replaces_another_values_file(&renamed, "backfill-p-d-2024-01-01").is_some());
        // Another pipeline's file, a job that is not a backfill's, or a commit that is not a
        // backfill value's, are not judged.
        assert_eq!(
            replaces_another_values_file(&day2, "backfill-pq-d-2024-01-01"),
            None
        );
        assert_eq!(
            replaces_another_values_file(&day2, "nightly-2024-01-01"),
            None
        );
        let nightly = summary("nightly-2024-01-02", "p", &[("d", "2024-01-02")]);
        assert_eq!(
            replaces_another_values_file(&nightly, "backfill-p-d-2024-01-01"),
            None
        );
    }

    #[test]
    fn a_backfill_value_may_not_replace_another_values_rows() {
        let day2 = summary("backfill-p-d-2024-01-02", "p", &[("d", "2024-01-02")]);
        let day1 = summary("backfill-p-d-2024-01-01", "p", &[("d", "2024-01-01")]);
        let other = replaces_another_value(&day2, &day1).unwrap();
        assert_eq!(
            refusal(&other).split(" of a backfill").next(),
            Some(
                "backfill value d=2024-01-02 would replace rows committed by value d=2024-01-01 (job backfill-p-d-2024-01-01)"
            )
        );
        // A redo of the same value under a run id replaces its own rows.
        let redo = summary("backfill-p-fix-d-2024-01-01", "p", &[("d", "2024-01-01")]);
        assert_eq!(replaces_another_value(&redo, &day1), None);
        // ... but not another value's.
        assert!(replaces_another_value(&redo, &day2).is_some());
        // A parameter only one of them was given decides nothing.
        let more = summary(
            "backfill-p-d-2024-01-01",
            "p",
            &[("d", "2024-01-01"), ("env", "prod")],
        );
        assert_eq!(replaces_another_value(&more, &day1), None);
        // Only the ranged parameter is the value: a redo whose other parameter changed
        // replaces its own value's rows, and only the value is named.
        let ranged = |job: &str, d: &str, to: &str| summary(job, "p", &[("d", d), ("to", to)]);
        let other = replaces_another_value(
            &ranged("backfill-p-d-2", "2", "x"),
            &ranged("backfill-p-d-1", "1", "x"),
        )
        .unwrap();
        assert_eq!((other.ours.as_str(), other.theirs.as_str()), ("d=2", "d=1"));
        assert_eq!(
            replaces_another_value(
                &ranged("backfill-p-fix-d-1", "1", "y"),
                &ranged("backfill-p-d-1", "1", "x")
            ),
            None
        );
        // A value of the pipeline under a name it had before is its own.
        let mut renamed = summary("backfill-q-d-2024-01-02", "q", &[("d", "2024-01-02")]);
        renamed.insert(
            crate::incremental::PREVIOUS_NAMES_PROPERTY.into(),
            "p".into(),
        );
        assert!(replaces_another_value(&renamed, &day1).is_some());
        // Another pipeline's rows, or a run that is not a backfill's, are not judged.
        let other = summary("backfill-q-d-2024-01-01", "q", &[("d", "2024-01-01")]);
        assert_eq!(replaces_another_value(&day2, &other), None);
        let nightly = summary("nightly-2024-01-01", "p", &[("d", "2024-01-01")]);
        assert_eq!(replaces_another_value(&day2, &nightly), None);
        assert_eq!(replaces_another_value(&nightly, &day2), None);
    }
}
