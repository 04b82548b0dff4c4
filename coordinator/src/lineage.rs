//! What a job's snapshot says about how it was made: the snapshot summary's `nightshift.*`
//! properties, built here from the spec, the inputs the planner read and the checks' verdicts.
//!
//! - `nightshift.pipeline`, `nightshift.code-sha256` (the spec's and SQL's text),
//!   `nightshift.git-commit` (when the spec lives in a git checkout);
//! - `nightshift.param.<name>` (secret-named ones masked);
//! - `nightshift.input.<source>`: `files=N bytes=B`, and `snapshot=ID` for an Iceberg source;
//! - `nightshift.consumed.<table>` and `nightshift.consumed-after.<table>`: for an incremental
//!   source, the snapshots consumed (the next run reads what came after; the commit lands only
//!   on a history that still ends at `after`; see `nightshift_core::incremental`);
//! - `nightshift.check.<name>`: `passed`, `quarantined: <detail>` (rows set aside, the
//!   others published) or `failed (<severity>): <detail>`.
//!
//! `nightshift.job-id` is added by the commit itself (it is what makes the commit
//! idempotent). `nightshift history TABLE` reads them back.

use std::collections::HashMap;

use nightshift_core::checks::CheckResult;
use nightshift_core::redact::{MASK, is_secret_name, redact};
use nightshift_core::sources::SourceSummary;
use nightshift_core::table::PIPELINE_PROPERTY;
use nightshift_spec::ResolvedSpec;

/// Summary key of the digest of the spec's and SQL's text.
pub const CODE_DIGEST_PROPERTY: &str = "nightshift.code-sha256";
/// Summary key of the spec repository's git commit.
pub const GIT_COMMIT_PROPERTY: &str = "nightshift.git-commit";

/// The summary properties of a job's snapshot.
pub fn snapshot_summary(
    spec: &ResolvedSpec,
    inputs: &[SourceSummary],
    checks: &[CheckResult],
) -> HashMap<String, String> {
    let mut summary = HashMap::new();
    summary.insert(
        PIPELINE_PROPERTY.to_string(),
        spec.spec.pipeline.name.clone(),
    );
    if !spec.spec.pipeline.previous_names.is_empty() {
        summary.insert(
            nightshift_core::incremental::PREVIOUS_NAMES_PROPERTY.to_string(),
            spec.spec.pipeline.previous_names.join("\n"),
        );
    }
    summary.insert(CODE_DIGEST_PROPERTY.to_string(), spec.code_digest.clone());
    if let Some(commit) = &spec.git_commit {
        summary.insert(GIT_COMMIT_PROPERTY.to_string(), commit.clone());
    }
    for (k, v) in &spec.params {
        summary.insert(
            format!("nightshift.param.{k}"),
            param_as_recorded(k, v).into_owned(),
        );
    }
    for input in inputs {
        let mut read = format!("files={} bytes={}", input.files, input.bytes);
        if let Some(snapshot) = input.snapshot_id {
            read = format!("snapshot={snapshot} {read}");
        }
        if let Some(what) = &input.read {
            read = format!("{read} ({what})");
        }
        summary.insert(format!("nightshift.input.{}", input.name), read);
        if let Some(consumed) = &input.consumed {
            summary.extend(consumed.summary());
        }
    }
    for check in checks {
        summary.insert(format!("nightshift.check.{}", check.name), verdict(check));
    }
    summary
}

/// How a snapshot summary states `check`'s outcome: a quarantine is not a failure (the job
/// published the rows that passed), whatever its severity.
fn verdict(check: &CheckResult) -> String {
    match (check.passed, check.quarantined) {
        (true, _) => "passed".to_string(),
        (false, true) => format!("quarantined: {}", check.detail),
        (false, false) => format!("failed ({}): {}", check.severity, check.detail),
    }
}

/// Parameter `name`'s `value` as a snapshot summary (and so the report page) states it:
/// whoever reads the table reads its summaries. A secret-named parameter is masked whole;
/// any other is redacted like a log line, so a URL's password or a bearer token in a value
/// is masked whatever the parameter is called.
fn param_as_recorded<'a>(name: &str, value: &'a str) -> std::borrow::Cow<'a, str> {
    if is_secret_name(name) {
        std::borrow::Cow::Borrowed(MASK)
    } else {
        redact(value)
    }
}

/// Why the snapshot that holds a job's id (its `summary`) was not made by `spec`: another
/// pipeline, other code, or other parameters under the same job id. `None` when it was
/// this spec's: the job is done, a rerun does nothing. A property the snapshot lacks is no
/// evidence either way; a secret-named parameter is masked there and not compared.
pub fn committed_by_another(
    spec: &ResolvedSpec,
    summary: &HashMap<String, String>,
) -> Option<String> {
    let differs = |key: &str, ours: &str| summary.get(key).is_some_and(|theirs| theirs != ours);
    if differs(PIPELINE_PROPERTY, &spec.spec.pipeline.name) {
        return Some(format!(
            "by pipeline `{}`, not `{}`",
            summary[PIPELINE_PROPERTY], spec.spec.pipeline.name
        ));
    }
    if differs(CODE_DIGEST_PROPERTY, &spec.code_digest) {
        return Some("with another spec or SQL (its code digest differs)".to_string());
    }
    let mut params: Vec<_> = spec.params.iter().collect();
    params.sort();
    for (name, value) in params {
        if is_secret_name(name) {
            continue;
        }
        let key = format!("nightshift.param.{name}");
        let recorded = param_as_recorded(name, value);
        // A snapshot made before values were redacted holds the value as it was.
        if differs(&key, &recorded) && differs(&key, value) {
            return Some(format!(
                "with {name} = `{}`, not `{recorded}`",
                redact(&summary[&key])
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_job_id_found_in_a_snapshot_of_another_pipeline_code_or_parameters_is_refused() {
        let ours = spec("SELECT 1");
        let summary = snapshot_summary(&ours, &[], &[]);
        assert_eq!(committed_by_another(&ours, &summary), None);
        assert_eq!(committed_by_another(&ours, &HashMap::new()), None);
        let mut other_pipeline = summary.clone();
        other_pipeline.insert(PIPELINE_PROPERTY.into(), "orders".into());
        assert!(
            committed_by_another(&ours, &other_pipeline)
                .is_some_and(|why| why.contains("`orders`") && why.contains("`p`"))
        );
        let other_sql = snapshot_summary(&spec("SELECT 2"), &[], &[]);
        assert!(committed_by_another(&ours, &other_sql).is_some_and(|why| why.contains("SQL")));
        let mut other_day = summary.clone();
        other_day.insert("nightshift.param.day".into(), "2".into());
        assert!(
            committed_by_another(&ours, &other_day).is_some_and(|why| why.contains("day = `2`"))
        );
        let mut masked = summary;
        masked.insert("nightshift.param.api_token".into(), "***".into());
        assert_eq!(committed_by_another(&ours, &masked), None);
    }

    #[test]
    fn a_password_or_token_in_any_parameters_value_is_masked_in_the_summary() {
        let ours = with_params(&[
            ("source_url", "postgres://etl:hunter2@db:5432/sales"),
            ("auth_header", "Bearer abc.DEF-123"),
            ("day", "2024-01-01"),
        ]);
        let summary = snapshot_summary(&ours, &[], &[]);
        assert_eq!(
            summary["nightshift.param.source_url"],
            "postgres://etl:***@db:5432/sales"
        );
        assert_eq!(summary["nightshift.param.auth_header"], "Bearer ***");
        assert_eq!(summary["nightshift.param.day"], "2024-01-01");
        assert!(!format!("{summary:?}").contains("hunter2"));
        // The same request is recognised in its own snapshot, and in one written before
        // values were redacted.
        assert_eq!(committed_by_another(&ours, &summary), None);
        let mut before = summary.clone();
        before.insert(
            "nightshift.param.source_url".into(),
            "postgres://etl:hunter2@db:5432/sales".into(),
        );
        assert_eq!(committed_by_another(&ours, &before), None);
        // Another host is another request; the refusal does not quote either password.
        let other = with_params(&[
            ("source_url", "postgres://etl:hunter3@replica:5432/sales"),
            ("auth_header", "Bearer abc.DEF-123"),
            ("day", "2024-01-01"),
        ]);
        let why = committed_by_another(&other, &before).unwrap();
        assert!(
            why.contains("source_url") && why.contains("replica"),
            "{why}"
        );
        assert!(!why.contains("hunter"), "{why}");
    }

    fn with_params(params: &[(&str, &str)]) -> ResolvedSpec {
        let declared: String = params
            .iter()
            .map(|(k, _)| format!("{k} = \"x\"\n"))
            .collect();
        let text = format!(
            "[pipeline]\nname = \"p\"\n[params]\n{declared}[transform]\nsql = \"SELECT 1\"\n[target]\ntable = \"a.b\"\n"
        );
        let given: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        nightshift_spec::resolve_spec_text(&text, Path::new("p.toml"), Path::new("/"), &given)
            .unwrap()
    }
    use std::sync::Arc;

    fn spec(sql: &str) -> ResolvedSpec {
        let text = format!(
            "[pipeline]\nname = \"p\"\n[params]\nday = \"1\"\napi_token = \"x\"\n[transform]\nsql = \"{sql}\"\n[target]\ntable = \"a.b\"\n"
        );
        nightshift_spec::resolve_spec_text(&text, Path::new("p.toml"), Path::new("/"), &[]).unwrap()
    }

    fn input(name: &str, snapshot_id: Option<i64>) -> SourceSummary {
        SourceSummary {
            name: name.into(),
            format: nightshift_spec::SourceFormat::Parquet,
            location: String::new(),
            files: 3,
            bytes: 1200,
            schema: Arc::new(datafusion::arrow::datatypes::Schema::empty()),
            snapshot_id,
            consumed: None,
            read: None,
            nothing_new: false,
        }
    }

    #[test]
    fn the_summary_names_code_inputs_params_and_checks() {
        let mut with_git = spec("SELECT 1");
        with_git.git_commit = Some("0123abc".into());
        let check = CheckResult {
            name: "rows".into(),
            severity: "warn".into(),
            passed: false,
            failed_rows: 0,
            detail: "0 rows written, at least 1 rows expected".into(),
            samples: Vec::new(),
            quarantined: false,
        };
        let events = SourceSummary {
            consumed: Some(nightshift_core::incremental::Consumption {
                table: "raw.events".into(),
                after: Some(70),
                upto: 77,
            }),
            read: Some("2 appended snapshot(s) since the last run".into()),
            ..input("events", Some(77))
        };
        let summary = snapshot_summary(
            &with_git,
            &[input("orders", None), input("dims", Some(42)), events],
            &[check],
        );
        assert_eq!(summary["nightshift.consumed.raw.events"], "77");
        assert_eq!(summary["nightshift.consumed-after.raw.events"], "70");
        assert_eq!(
            summary["nightshift.input.events"],
            "snapshot=77 files=3 bytes=1200 (2 appended snapshot(s) since the last run)"
        );
        assert_eq!(
            summary
                .keys()
                .filter(|k| k.starts_with("nightshift.consumed."))
                .count(),
            1
        );
        assert_eq!(summary["nightshift.pipeline"], "p");
        assert_eq!(summary[CODE_DIGEST_PROPERTY].len(), 64);
        assert_eq!(summary[GIT_COMMIT_PROPERTY], "0123abc");
        assert_eq!(summary["nightshift.param.day"], "1");
        assert_eq!(summary["nightshift.param.api_token"], MASK);
        assert_eq!(summary["nightshift.input.orders"], "files=3 bytes=1200");
        assert_eq!(
            summary["nightshift.input.dims"],
            "snapshot=42 files=3 bytes=1200"
        );
        assert_eq!(
            summary["nightshift.check.rows"],
            "failed (warn): 0 rows written, at least 1 rows expected"
        );
        assert!(!snapshot_summary(&spec("SELECT 1"), &[], &[]).contains_key(GIT_COMMIT_PROPERTY));
    }

    #[test]
    fn a_quarantine_is_stated_as_such_whatever_its_severity() {
        let check = |passed, quarantined| CheckResult {
            name: "known_status".into(),
            severity: "error".into(),
            passed,
            failed_rows: 1,
            detail: "1 rows set aside".into(),
            samples: Vec::new(),
            quarantined,
        };
        assert_eq!(verdict(&check(true, false)), "passed");
        assert_eq!(verdict(&check(true, true)), "passed");
        assert_eq!(
            verdict(&check(false, true)),
            "quarantined: 1 rows set aside"
        );
        assert_eq!(
            verdict(&check(false, false)),
            "failed (error): 1 rows set aside"
        );
    }

    #[test]
    fn the_code_digest_follows_the_text_not_the_parameters() {
        let a = spec("SELECT 1");
        assert_eq!(a.code_digest, spec("SELECT 1").code_digest);
        assert_ne!(a.code_digest, spec("SELECT 2").code_digest);
        let overridden = nightshift_spec::resolve_spec_text(
            "[pipeline]\nname = \"p\"\n[params]\nday = \"1\"\napi_token = \"x\"\n[transform]\nsql = \"SELECT 1\"\n[target]\ntable = \"a.b\"\n",
            Path::new("p.toml"),
            Path::new("/"),
            &[("day".into(), "2".into())],
        )
        .unwrap();
        assert_eq!(a.code_digest, overridden.code_digest);
    }
}
