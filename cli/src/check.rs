//! `nightshift check SPEC --sample DIR`: a pipeline's CI test. Each source reads its sample
//! from `DIR` instead of its location; the contracts are checked, the transform runs and every
//! `[[check]]` is judged, in a throw-away warehouse. The outcome is a list of test cases,
//! printed for people, as JSON, or as JUnit XML for CI systems.

use std::path::{Path, PathBuf};

use nightshift_coordinator::{JobError, JobOptions};
use nightshift_core::CoreError;
use nightshift_core::ids::JobId;
use nightshift_spec::{ResolvedSpec, SourceFormat};

use crate::embedded::{EmbeddedOptions, run_embedded};

/// One test case of a pipeline check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Case {
    /// `spec`, `source <name>`, `transform` or `check <name>`.
    pub name: String,
    pub passed: bool,
    /// `error` fails the check run; `warn` is reported only.
    pub severity: String,
    pub message: String,
}

impl Case {
    fn new(name: impl Into<String>, outcome: Result<String, String>) -> Self {
        let passed = outcome.is_ok();
        Case {
            name: name.into(),
            passed,
            severity: "error".into(),
            message: outcome.unwrap_or_else(|e| e),
        }
    }

    /// A failure that fails the run.
    pub fn fails_the_run(&self) -> bool {
        !self.passed && self.severity == "error"
    }
}

/// Every case of `spec` (already loaded, or the error loading it) run on the samples in
/// `sample_dir`.
pub async fn check_pipeline(spec: Result<ResolvedSpec, String>, sample_dir: &Path) -> Vec<Case> {
    let mut spec = match spec {
        Ok(spec) => spec,
        Err(e) => return vec![Case::new("spec", Err(e))],
    };
    let mut cases = vec![Case::new("spec", Ok("parses and resolves".into()))];
    // A relationship check reads another table of the real catalog, which a sample run
    // never opens.
    spec.spec.check.retain(|check| {
        let Some(to) = &check.to else { return true };
        let mut skipped = Case::new(
            format!("check {}", check.name),
            Err(format!(
                "not run: relationship checks have no sample of their table (`{to}`) yet; it runs against the catalog"
            )),
        );
        skipped.severity = "warn".into();
        cases.push(skipped);
        false
    });
    let mut missing = false;
    for source in &mut spec.spec.source {
        if source.format == SourceFormat::Iceberg {
            cases.push(Case::new(
                format!("source {}", source.name),
                Err("Iceberg sources have no sample yet; give the pipeline a file source to check it".into()),
            ));
            missing = true;
            continue;
        }
        match sample_of(sample_dir, &source.name, source.format) {
            Some(sample) => source.location = Some(sample.display().to_string()),
            None => {
                cases.push(Case::new(
                    format!("source {}", source.name),
                    Err(format!(
                        "no sample: put {dir}/{name}.{ext} or a directory {dir}/{name}/ there",
                        dir = sample_dir.display(),
                        name = source.name,
                        ext = source.format
                    )),
                ));
                missing = true;
            }
        }
    }
    if missing {
        return cases;
    }
    // A warehouse of its own, deleted when the check ends: the check never writes to, nor
    // deletes from, the pipeline's real warehouse or catalog.
    let warehouse = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            cases.push(Case::new(
                "transform",
                Err(format!("no scratch warehouse: {e}")),
            ));
            return cases;
        }
    };
    let mut embedded = EmbeddedOptions::new(warehouse.path().to_path_buf(), 1);
    // A run on samples is a test, not lineage.
    embedded.lineage = false;
    let options = JobOptions::new(JobId::generate(), 1);
    let outcome = run_embedded(&spec, &embedded, &options, &|_| {}).await;
    let sources_ok = |cases: &mut Vec<Case>| {
        for source in &spec.spec.source {
            cases.push(Case::new(
                format!("source {}", source.name),
                Ok("sample read, contract holds".into()),
            ));
        }
    };
    let check_cases = |results: &[nightshift_core::checks::CheckResult]| -> Vec<Case> {
        results.iter().map(check_case).collect()
    };
    match outcome {
        Ok(report) => {
            sources_ok(&mut cases);
            cases.push(Case::new("transform", Ok(format!("{} rows", report.rows))));
            cases.extend(check_cases(&report.checks));
        }
        Err(JobError::ChecksFailed(results)) => {
            sources_ok(&mut cases);
            cases.push(Case::new("transform", Ok("ran".into())));
            cases.extend(check_cases(&results));
        }
        Err(JobError::Invalid(e @ (CoreError::Source { .. } | CoreError::Contract { .. }))) => {
            let name = match &e {
                CoreError::Source { source_name, .. } | CoreError::Contract { source_name, .. } => {
                    source_name.clone()
                }
                _ => unreachable!("matched above"),
            };
            cases.push(Case::new(format!("source {name}"), Err(e.to_string())));
        }
        Err(e) => {
            // A task that failed reading a sample (a value that does not parse as its
            // contract says) is that source's drift, not the transform's.
            let message = e.to_string();
            let culprit = spec.spec.source.iter().find(|s| {
                s.location
                    .as_deref()
                    .is_some_and(|l| message.contains(l.trim_end_matches('/')))
            });
            match culprit {
                Some(source) => {
                    cases.push(Case::new(format!("source {}", source.name), Err(message)))
                }
                None => cases.push(Case::new("transform", Err(message))),
            }
        }
    }
    cases
}

/// `dir/<name>/` or `dir/<name>.<ext>` for the source's format.
fn sample_of(dir: &Path, name: &str, format: SourceFormat) -> Option<PathBuf> {
    let directory = dir.join(name);
    if directory.is_dir() {
        return Some(std::path::absolute(&directory).ok()?.join(""));
    }
    let extensions: &[&str] = match format {
        SourceFormat::Json => &["json", "jsonl", "ndjson"],
        SourceFormat::Csv => &["csv"],
        _ => &["parquet"],
    };
    extensions
        .iter()
        .map(|ext| dir.join(format!("{name}.{ext}")))
        .find(|file| file.is_file())
        .and_then(|file| std::path::absolute(file).ok())
}

/// The case of a judged `[[check]]`. One that set rows aside (`on_fail = "quarantine"`)
/// warns, whatever its severity: the run publishes the other rows, so it is not a failure;
/// its message says so.
fn check_case(result: &nightshift_core::checks::CheckResult) -> Case {
    let detail = match result.quarantined && !result.passed {
        true => format!("quarantined: {}", result.detail),
        false => result.detail.clone(),
    };
    Case {
        name: format!("check {}", result.name),
        passed: result.passed,
        severity: match result.quarantined {
            true => "warn".to_string(),
            false => result.severity.clone(),
        },
        message: if result.samples.is_empty() {
            detail
        } else {
            format!("{detail}; e.g. {}", result.samples.join(", "))
        },
    }
}

/// The cases for people: a line each, the failures' messages under them, a count.
pub fn cases_text(pipeline: &str, cases: &[Case]) -> String {
    let mut text = format!("pipeline {pipeline}\n");
    for case in cases {
        let mark = match (case.passed, case.severity.as_str()) {
            (true, _) => "ok  ",
            (false, "warn") => "WARN",
            (false, _) => "FAIL",
        };
        text.push_str(&format!("  {mark} {}: {}\n", case.name, case.message));
    }
    let failed = cases.iter().filter(|c| c.fails_the_run()).count();
    text.push_str(&format!(
        "{} cases, {failed} failed, {} warned\n",
        cases.len(),
        cases
            .iter()
            .filter(|c| !c.passed && !c.fails_the_run())
            .count()
    ));
    text
}

/// The cases as a JUnit XML report: one `<testsuite>` for the pipeline, a `<testcase>` per
/// case, `<failure>` for failures of error severity and `<system-out>` for warnings.
pub fn junit_xml(pipeline: &str, cases: &[Case]) -> String {
    let failures = cases.iter().filter(|c| c.fails_the_run()).count();
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"nightshift check\" tests=\"{}\" failures=\"{failures}\">\n  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\">\n",
        cases.len(),
        escape(pipeline),
        cases.len()
    );
    for case in cases {
        xml.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\"",
            escape(pipeline),
            escape(&case.name)
        ));
        if case.fails_the_run() {
            xml.push_str(&format!(
                ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                escape(&case.message),
                escape(&case.message)
            ));
        } else if !case.passed {
            xml.push_str(&format!(
                ">\n      <system-out>warning: {}</system-out>\n    </testcase>\n",
                escape(&case.message)
            ));
        } else {
            xml.push_str("/>\n");
        }
    }
    xml.push_str("  </testsuite>\n</testsuites>\n");
    xml
}

/// Text as XML character data or an attribute value.
fn escape(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control() || matches!(c, '\n' | '\t'))
        .fold(String::with_capacity(text.len()), |mut out, c| {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '"' => out.push_str("&quot;"),
                '\'' => out.push_str("&apos;"),
                c => out.push(c),
            }
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, passed: bool, severity: &str, message: &str) -> Case {
        Case {
            name: name.into(),
            passed,
            severity: severity.into(),
            message: message.into(),
        }
    }

    #[test]
    fn a_check_that_set_rows_aside_warns_and_does_not_fail_the_run() {
        let result = |quarantined| nightshift_core::checks::CheckResult {
            name: "known_status".into(),
            severity: "error".into(),
            passed: false,
            failed_rows: 1,
            detail: "1 rows set aside".into(),
            samples: vec!["{\"status\":\"x\"}".into()],
            quarantined,
        };
        let set_aside = check_case(&result(true));
        assert!(!set_aside.fails_the_run(), "{set_aside:?}");
        assert_eq!(set_aside.severity, "warn");
        assert_eq!(
            set_aside.message,
            "quarantined: 1 rows set aside; e.g. {\"status\":\"x\"}"
        );
        let failed = check_case(&result(false));
        assert!(failed.fails_the_run(), "{failed:?}");
        assert_eq!(failed.message, "1 rows set aside; e.g. {\"status\":\"x\"}");
    }

    #[test]
    fn junit_has_a_case_each_and_failures_only_for_errors() {
        let cases = [
            case("spec", true, "error", "ok"),
            case(
                "check a<b",
                false,
                "error",
                "2 of 5 rows fail \"x\" >= 0; e.g. {\"x\":-1}",
            ),
            case("check w", false, "warn", "1 of 5 rows"),
        ];
        let xml = junit_xml("p&q", &cases);
        assert!(
            xml.contains("<testsuite name=\"p&amp;q\" tests=\"3\" failures=\"1\""),
            "{xml}"
        );
        assert!(
            xml.contains("<testcase classname=\"p&amp;q\" name=\"spec\"/>"),
            "{xml}"
        );
        assert!(
            xml.contains("name=\"check a&lt;b\">\n      <failure message=\"2 of 5 rows fail &quot;x&quot; &gt;= 0; e.g. {&quot;x&quot;:-1}\">"),
            "{xml}"
        );
        assert!(
            xml.contains("<system-out>warning: 1 of 5 rows</system-out>"),
            "{xml}"
        );
        let text = cases_text("p", &cases);
        assert!(text.ends_with("3 cases, 1 failed, 1 warned\n"), "{text}");
        assert!(text.contains("  FAIL check a<b: 2 of 5 rows"), "{text}");
    }
}
