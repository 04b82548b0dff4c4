//! `nightshift backfill`: one job per value of a parameter range, each committed as its own
//! snapshot, resumable.
//!
//! Each value's job id is derived from the pipeline, the parameter and the value, so a rerun
//! of the same backfill finds the values already committed in the table's history and skips
//! them (the job ends as "committed by an earlier run"). A full `overwrite` target is refused:
//! each value would replace the previous one's rows.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use chrono::{Duration as Days, NaiveDate};
use futures::StreamExt;
use nightshift_coordinator::JobOptions;
use nightshift_core::ids::JobId;
use nightshift_core::table::backfill_values::BACKFILL_JOB_PREFIX;
use nightshift_proto::v1::Job;
use nightshift_spec::{ResolvedSpec, WriteMode, load_spec};

use crate::embedded::{EmbeddedOptions, run_embedded};

/// The values a range walks through, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamRange {
    pub key: String,
    pub values: Vec<String>,
}

/// Most values one backfill runs (a typo such as a year too many should not start 10,000
/// jobs).
pub const MAX_VALUES: usize = 10_000;

/// Parses `key=FIRST..LAST` (both ends included): dates (`2024-01-01..2024-01-31`, stepping
/// `step` days) or integers (`1..12`, stepping `step`).
pub fn parse_param_range(arg: &str, step: u32) -> Result<ParamRange, String> {
    let (key, range) = arg
        .split_once('=')
        .filter(|(k, _)| !k.trim().is_empty())
        .ok_or_else(|| format!("expected KEY=FIRST..LAST, got `{arg}`"))?;
    let (first, last) = range
        .split_once("..")
        .ok_or_else(|| format!("expected FIRST..LAST after `{key}=`, got `{range}`"))?;
    if step == 0 {
        return Err("--step must be at least 1".into());
    }
    let values = match (
        NaiveDate::parse_from_str(first, "%Y-%m-%d"),
        NaiveDate::parse_from_str(last, "%Y-%m-%d"),
    ) {
        (Ok(first), Ok(last)) => walk(
            first,
            last,
            |d| d + Days::days(step.into()),
            |d| d.format("%Y-%m-%d").to_string(),
        ),
        _ => match (first.parse::<i64>(), last.parse::<i64>()) {
            (Ok(first), Ok(last)) => walk(first, last, |n| n + i64::from(step), |n| n.to_string()),
            _ => {
                return Err(format!(
                    "`{range}` is neither a date range (2024-01-01..2024-01-31) nor an integer range (1..12)"
                ));
            }
        },
    }?;
    Ok(ParamRange {
        key: key.trim().to_string(),
        values,
    })
}

fn walk<T: PartialOrd + Copy>(
    first: T,
    last: T,
    next: impl Fn(T) -> T,
    show: impl Fn(T) -> String,
) -> Result<Vec<String>, String> {
    if first > last {
        return Err(format!(
            "the range is empty: {} is after {}",
            show(first),
            show(last)
        ));
    }
    let mut values = Vec::new();
    let mut at = first;
    while at <= last {
        if values.len() == MAX_VALUES {
            return Err(format!("the range has more than {MAX_VALUES} values"));
        }
        values.push(show(at));
        at = next(at);
    }
    Ok(values)
}

/// The job id of one value: `backfill-<pipeline>-<key>-<value>`, or with a run id
/// `backfill-<pipeline>-<run>-<key>-<value>`, with characters a job id cannot hold replaced
/// by `_`. The same backfill always gives the same ids (so it resumes); a new run id gives
/// new ones (so it redoes values committed before, after a bug fix).
pub fn value_job_id(
    pipeline: &str,
    run: Option<&str>,
    key: &str,
    value: &str,
) -> Result<JobId, String> {
    let raw = match run {
        Some(run) => format!("{BACKFILL_JOB_PREFIX}{pipeline}-{run}-{key}-{value}"),
        None => format!("{BACKFILL_JOB_PREFIX}{pipeline}-{key}-{value}"),
    };
    JobId::parse(&nightshift_core::table::backfill_values::job_id_text(&raw))
}

/// Whether a backfill of `spec` makes sense: each value must add to the table, not replace
/// it; and a redo (`run_id`) must replace what the values committed before, not add to it.
pub fn check_mode(spec: &ResolvedSpec, run_id: Option<&str>) -> Result<(), String> {
    match spec.spec.target.mode {
        WriteMode::Append if run_id.is_some() => Err(format!(
            "--run-id redoes values committed before, and [target] mode = \"append\" would add their rows to `{}` a second time beside the first; a redo needs a target that replaces them: mode = \"overwrite_partitions\" (each value replaces its partitions) or \"merge\" (keys replace rows). Without --run-id, a backfill skips the values already committed and runs the rest",
            spec.spec.target.table
        )),
        WriteMode::Append | WriteMode::OverwritePartitions | WriteMode::Merge => Ok(()),
        WriteMode::Overwrite => Err(format!(
            "[target] mode = \"overwrite\" replaces the whole table on every run, so a backfill of `{}` would leave only its last value; use mode = \"overwrite_partitions\" (each value replaces its own partitions) or \"append\"",
            spec.spec.target.table
        )),
        WriteMode::Compact => Err(format!(
            "[target] mode = \"compact\" rewrites the files of `{}` whatever the parameters; run `nightshift maintain --compact` instead of a backfill",
            spec.spec.target.table
        )),
    }
}

/// What became of one value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ValueOutcome {
    pub value: String,
    pub job_id: String,
    /// `committed`, `skipped` (committed by an earlier run), `empty`, `failed`, `not run`.
    pub status: &'static str,
    pub snapshot_id: Option<i64>,
    pub rows: u64,
    pub seconds: f64,
    pub error: Option<String>,
}

impl ValueOutcome {
    fn not_run(value: &str) -> Self {
        ValueOutcome {
            value: value.to_string(),
            job_id: String::new(),
            status: "not run",
            snapshot_id: None,
            rows: 0,
            seconds: 0.0,
            error: None,
        }
    }

    fn failed(value: &str, error: String) -> Self {
        ValueOutcome {
            status: "failed",
            error: Some(error),
            ..ValueOutcome::not_run(value)
        }
    }

    pub fn from_result(
        value: &str,
        job_id: &JobId,
        started: Instant,
        result: &Result<nightshift_coordinator::JobReport, nightshift_coordinator::JobError>,
    ) -> Self {
        let (status, snapshot_id, rows, error) = match result {
            Ok(r) if r.already_committed => ("skipped", r.snapshot_id, r.rows, None),
            Ok(r) if r.snapshot_id.is_none() => ("empty", None, 0, None),
            Ok(r) => ("committed", r.snapshot_id, r.rows, None),
            Err(e) => ("failed", None, 0, Some(e.to_string())),
        };
        ValueOutcome {
            value: value.to_string(),
            job_id: job_id.to_string(),
            status,
            snapshot_id,
            rows,
            seconds: started.elapsed().as_secs_f64(),
            error,
        }
    }
}

/// Where each value's job runs.
pub enum Backend<'a> {
    /// In this process (`embedded`, with each job's options).
    Embedded {
        embedded: &'a EmbeddedOptions,
        options: &'a dyn Fn(JobId) -> JobOptions,
    },
    /// Submitted to a cluster's coordinator through its job queue, as `run --cluster`
    /// does, waiting at most `timeout` for each value.
    Cluster {
        config: &'a nightshift_cluster::config::ClusterConfig,
        timeout: std::time::Duration,
    },
    /// Submitted through the job API (`SubmitJobRequest.job_id` carries the value's job id),
    /// followed until it ends.
    Api {
        server: &'a str,
        token: Option<String>,
    },
}

/// Submits the value's job through the job API under its own id and follows it to its end:
/// whether the submission created it (a job found succeeded before is not), and the job.
async fn submit_through_api(
    (server, token): (&str, &Option<String>),
    spec_path: &Path,
    job_id: &JobId,
    params: Vec<(String, String)>,
) -> Result<(bool, Job), String> {
    let mut client = crate::client::connect(server, token.clone()).await?;
    let mut request =
        crate::client::submit_request(&spec_path.display().to_string(), params, None)?;
    request.job_id = job_id.to_string();
    let submitted = client
        .submit_job(request)
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let mut stream = client
        .watch_job(crate::client::get(&submitted.job_id))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let mut last = None;
    while let Some(job) = stream
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        let ended = crate::client::exit_code(&job).is_some();
        last = Some(job);
        if ended {
            break;
        }
    }
    match last {
        Some(job) if crate::client::exit_code(&job).is_some() => Ok((submitted.created, job)),
        _ => Err(format!(
            "the job API stopped following job {job_id} before it ended"
        )),
    }
}

impl ValueOutcome {
    /// The outcome of a value submitted through the job API: `created` false and succeeded
    /// means committed by an earlier submission (skipped).
    pub fn from_api(
        value: &str,
        job_id: &JobId,
        started: Instant,
        created: bool,
        job: &Job,
    ) -> Self {
        let succeeded = crate::client::exit_code(job) == Some(0);
        let snapshot_id = (job.snapshot_id != 0).then_some(job.snapshot_id);
        let status = match (succeeded, created, snapshot_id) {
            (false, ..) => "failed",
            (true, false, _) => "skipped",
            (true, true, None) => "empty",
            (true, true, Some(_)) => "committed",
        };
        ValueOutcome {
            value: value.to_string(),
            job_id: job_id.to_string(),
            status,
            snapshot_id,
            rows: job.rows,
            seconds: started.elapsed().as_secs_f64(),
            error: (!succeeded).then(|| {
                if job.error.is_empty() {
                    format!("the job {}", crate::client::state_name(job))
                } else {
                    job.error.clone()
                }
            }),
        }
    }

    /// The outcome of a value run on a cluster, from the outcome its coordinator stored.
    pub fn from_cluster(
        value: &str,
        job_id: &JobId,
        started: Instant,
        json: &serde_json::Value,
    ) -> Self {
        let succeeded = json["status"] == "succeeded";
        let snapshot_id = json["snapshot_id"].as_i64();
        let status = match (succeeded, json["already_committed"].as_bool(), snapshot_id) {
            (false, ..) => "failed",
            (true, Some(true), _) => "skipped",
            (true, _, None) => "empty",
            (true, _, Some(_)) => "committed",
        };
        ValueOutcome {
            value: value.to_string(),
            job_id: job_id.to_string(),
            status,
            snapshot_id,
            rows: json["rows"].as_u64().unwrap_or(0),
            seconds: started.elapsed().as_secs_f64(),
            error: (!succeeded).then(|| {
                json["error"]
                    .as_str()
                    .unwrap_or("the job failed")
                    .to_string()
            }),
        }
    }
}

/// Runs one job per value of `range` on `backend`, at most `parallel` at once, in order of
/// the values. After a failure no further value starts (values already running finish); the
/// rest are reported as not run, so a rerun resumes there. `on_done` sees each outcome as it
/// ends.
pub async fn run_backfill(
    spec_path: &Path,
    params: &[(String, String)],
    range: &ParamRange,
    run_id: Option<&str>,
    backend: &Backend<'_>,
    parallel: usize,
    on_done: impl Fn(&ValueOutcome),
) -> Vec<ValueOutcome> {
    let stop = AtomicBool::new(false);
    let run_value = |value: String| {
        let (stop, on_done) = (&stop, &on_done);
        async move {
            let started = Instant::now();
            let mut value_params = params.to_vec();
            value_params.push((range.key.clone(), value.clone()));
            let spec = load_spec(spec_path, &value_params);
            let job_id = match &spec {
                Ok(spec) => value_job_id(&spec.spec.pipeline.name, run_id, &range.key, &value),
                Err(_) => value_job_id("invalid", run_id, &range.key, &value),
            };
            let outcome = match (spec, job_id) {
                _ if stop.load(Ordering::SeqCst) => ValueOutcome::not_run(&value),
                (Ok(spec), Ok(job_id)) => match backend {
                    Backend::Embedded { embedded, options } => {
                        let result =
                            run_embedded(&spec, embedded, &options(job_id.clone()), &|_| {}).await;
                        ValueOutcome::from_result(&value, &job_id, started, &result)
                    }
                    Backend::Api { server, token } => {
                        match submit_through_api((server, token), spec_path, &job_id, value_params)
                            .await
                        {
                            Ok((created, job)) => {
                                ValueOutcome::from_api(&value, &job_id, started, created, &job)
                            }
                            Err(e) => ValueOutcome::failed(&value, e),
                        }
                    }
                    Backend::Cluster { config, timeout } => {
                        match crate::cluster::submit_and_wait(
                            config,
                            spec_path,
                            &job_id,
                            value_params,
                            *timeout,
                        )
                        .await
                        {
                            Ok(json) => ValueOutcome::from_cluster(&value, &job_id, started, &json),
                            Err(e) => ValueOutcome::failed(&value, e.to_string()),
                        }
                    }
                },
                (Err(e), _) => ValueOutcome::failed(&value, e.to_string()),
                (_, Err(e)) => ValueOutcome::failed(&value, e),
            };
            if outcome.status == "failed" {
                stop.store(true, Ordering::SeqCst);
            }
            on_done(&outcome);
            outcome
        }
    };
    futures::stream::iter(range.values.iter().cloned())
        .map(run_value)
        .buffered(parallel.max(1))
        .collect()
        .await
}

/// The summary table printed at the end.
pub fn summary_table(key: &str, outcomes: &[ValueOutcome]) -> String {
    let width = outcomes
        .iter()
        .map(|o| o.value.len())
        .chain([key.len()])
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "{key:<width$}  {:<9}  {:>20}  {:>10}  {:>8}\n",
        "status", "snapshot", "rows", "seconds"
    );
    for o in outcomes {
        let snapshot = o
            .snapshot_id
            .map_or_else(|| "-".to_string(), |s| s.to_string());
        out.push_str(&format!(
            "{:<width$}  {:<9}  {:>20}  {:>10}  {:>8.1}\n",
            o.value, o.status, snapshot, o.rows, o.seconds
        ));
    }
    let count = |s: &str| outcomes.iter().filter(|o| o.status == s).count();
    out.push_str(&format!(
        "{} values: {} committed, {} skipped (committed before), {} empty, {} failed, {} not run\n",
        outcomes.len(),
        count("committed"),
        count("skipped"),
        count("empty"),
        count("failed"),
        count("not run"),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_ranges_step_by_days_and_include_both_ends() {
        let r = parse_param_range("run_date=2024-01-30..2024-02-02", 1).unwrap();
        assert_eq!(r.key, "run_date");
        assert_eq!(
            r.values,
            ["2024-01-30", "2024-01-31", "2024-02-01", "2024-02-02"]
        );
        let weekly = parse_param_range("d=2024-02-26..2024-03-12", 7).unwrap();
        assert_eq!(weekly.values, ["2024-02-26", "2024-03-04", "2024-03-11"]);
        let leap = parse_param_range("d=2024-02-28..2024-03-01", 1).unwrap();
        assert_eq!(leap.values.len(), 3);
    }

    #[test]
    fn integer_ranges() {
        assert_eq!(
            parse_param_range("n=-1..2", 1).unwrap().values,
            ["-1", "0", "1", "2"]
        );
        assert_eq!(
            parse_param_range("n=1..10", 4).unwrap().values,
            ["1", "5", "9"]
        );
        assert_eq!(parse_param_range("n=3..3", 1).unwrap().values, ["3"]);
    }

    #[test]
    fn bad_ranges_say_what_is_wrong() {
        for (arg, needle) in [
            ("run_date", "KEY=FIRST..LAST"),
            ("=1..2", "KEY=FIRST..LAST"),
            ("d=2024-01-01", "FIRST..LAST"),
            ("d=2024-01-31..2024-01-01", "empty"),
            ("d=2024-01-01..tomorrow", "neither"),
            ("d=2024-02-30..2024-03-01", "neither"),
            ("n=0..100000", "more than"),
        ] {
            let err = parse_param_range(arg, 1).unwrap_err();
            assert!(err.contains(needle), "{arg}: {err}");
        }
        assert!(
            parse_param_range("n=1..2", 0)
                .unwrap_err()
                .contains("--step")
        );
    }

    #[test]
    fn a_redo_must_replace_what_it_redoes() {
        let spec = |mode: &str| {
            let text = format!(
                "[pipeline]\nname = \"p\"\n[[source]]\nname = \"s\"\nformat = \"csv\"\nlocation = \"s.csv\"\n\
                 [transform]\nsql = \"SELECT * FROM s\"\n[target]\ntable = \"ns.t\"\nmode = \"{mode}\"\n{}",
                match mode {
                    "merge" => "merge_keys = [\"k\"]\n",
                    "overwrite_partitions" => "partition_by = [\"k\"]\n",
                    _ => "",
                }
            );
            nightshift_spec::resolve_spec_text(
                &text,
                std::path::Path::new("p.toml"),
                std::path::Path::new("."),
                &[],
            )
            .unwrap()
        };
        let append = spec("append");
        assert!(check_mode(&append, None).is_ok());
        let err = check_mode(&append, Some("fix-1")).unwrap_err();
        assert!(err.contains("a second time"), "{err}");
        for mode in ["overwrite_partitions", "merge"] {
            assert!(check_mode(&spec(mode), Some("fix-1")).is_ok(), "{mode}");
        }
        assert!(check_mode(&spec("overwrite"), None).is_err());
    }

    #[test]
    fn value_job_ids_are_stable_and_valid() {
        let a = value_job_id("daily revenue", None, "run_date", "2024-01-01").unwrap();
        assert_eq!(a.as_str(), "backfill-daily_revenue-run_date-2024-01-01");
        assert_eq!(
            a,
            value_job_id("daily revenue", None, "run_date", "2024-01-01").unwrap()
        );
        assert_ne!(
            a,
            value_job_id("daily revenue", None, "run_date", "2024-01-02").unwrap()
        );
        assert!(value_job_id("p", None, "k", "é/../x").is_ok());
        // A run id gives every value new ids.
        let fixed = value_job_id("daily revenue", Some("fix 2"), "run_date", "2024-01-01");
        assert_eq!(
            fixed.unwrap().as_str(),
            "backfill-daily_revenue-fix_2-run_date-2024-01-01"
        );
    }
}
