//! OpenLineage run events for each job: `START` once it has planned (its inputs known),
//! then `COMPLETE`, `FAIL` or `ABORT` (cancelled) when it ends, with the input datasets (each
//! with its schema), the output table (schema, data-quality assertions from the checks,
//! rows and bytes written) and, on failure, the error.
//!
//! Where they go is set by the environment, with the OpenLineage client's own names:
//! `OPENLINEAGE_URL` (POSTed to `<url>/<OPENLINEAGE_ENDPOINT>`, default `api/v1/lineage`,
//! with `OPENLINEAGE_API_KEY` as a bearer token) and/or `NIGHTSHIFT_LINEAGE_FILE` (one JSON
//! event per line, appended); the job namespace is `OPENLINEAGE_NAMESPACE` (default
//! `nightshift`). Emitting is best effort: a sink that fails is logged, never fails the job.
//!
//! The run id is a UUIDv5 of the job id, so a job resumed by another coordinator reports
//! under the same run.

use std::path::PathBuf;
use std::time::Duration;

use datafusion::arrow::datatypes::Schema;
use nightshift_core::checks::CheckResult;
use nightshift_core::sources::SourceSummary;
use nightshift_spec::{CheckSpec, SourceFormat};
use serde_json::{Value, json};
use tracing::warn;

const PRODUCER: &str = "https://github.com/nightshift-data/nightshift";
const SPEC: &str = "https://openlineage.io/spec";
const RUN_EVENT_SCHEMA: &str = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent";

/// Where events go (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct LineageSink {
    file: Option<PathBuf>,
    http: Option<(String, Option<String>)>,
    /// One client for every event (its connection pool outlives a job).
    client: reqwest::Client,
    namespace: String,
}

impl LineageSink {
    /// The sink the environment configures; `None` when it configures none.
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let file = var("NIGHTSHIFT_LINEAGE_FILE").map(PathBuf::from);
        let http = var("OPENLINEAGE_URL").map(|url| {
            let endpoint = var("OPENLINEAGE_ENDPOINT").unwrap_or_else(|| "api/v1/lineage".into());
            (
                format!(
                    "{}/{}",
                    url.trim_end_matches('/'),
                    endpoint.trim_start_matches('/')
                ),
                var("OPENLINEAGE_API_KEY"),
            )
        });
        (file.is_some() || http.is_some()).then(|| LineageSink {
            file,
            http,
            client: reqwest::Client::new(),
            namespace: var("OPENLINEAGE_NAMESPACE").unwrap_or_else(|| "nightshift".into()),
        })
    }

    /// A sink appending to `path` (tests, and `run --lineage-file`).
    pub fn to_file(path: PathBuf) -> Self {
        LineageSink {
            file: Some(path),
            namespace: "nightshift".into(),
            ..Default::default()
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Sends `event` to every configured destination; failures are logged.
    pub async fn emit(&self, event: &Value) {
        if let Some(path) = &self.file {
            let line = format!("{event}\n");
            let path = path.clone();
            let written = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(line.as_bytes()))
                    .map_err(|e| format!("{}: {e}", path.display()))
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "cannot write the OpenLineage event"),
                Err(e) => warn!(error = %e, "cannot write the OpenLineage event"),
            }
        }
        if let Some((url, key)) = &self.http {
            let mut request = self
                .client
                .post(url)
                .timeout(Duration::from_secs(10))
                .json(event);
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            match request.send().await {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => {
                    warn!(url, status = %response.status(), "the OpenLineage endpoint refused the event")
                }
                Err(e) => warn!(url, error = %e, "cannot send the OpenLineage event"),
            }
        }
    }
}

/// The state a run event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Start,
    Complete,
    Fail,
    Abort,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Start => "START",
            EventType::Complete => "COMPLETE",
            EventType::Fail => "FAIL",
            EventType::Abort => "ABORT",
        }
    }
}

/// What the output dataset of an ended job reports.
#[derive(Debug, Clone, Copy)]
pub struct Written<'a> {
    pub rows: u64,
    pub bytes: u64,
    pub checks: &'a [CheckResult],
    pub check_specs: &'a [CheckSpec],
}

/// Everything a job's events say.
#[derive(Debug, Clone, Copy)]
pub struct RunFacts<'a> {
    pub namespace: &'a str,
    pub job_id: &'a str,
    pub pipeline: &'a str,
    pub sql: &'a str,
    /// The catalog the target and the Iceberg sources live in.
    pub catalog: &'a str,
    pub table: &'a str,
    pub inputs: &'a [SourceSummary],
    /// The result's schema, once planned.
    pub output_schema: Option<&'a Schema>,
    /// Set on the end event of a job that wrote rows.
    pub written: Option<Written<'a>>,
    /// Set on a `FAIL` or `ABORT` event.
    pub error: Option<&'a str>,
}

/// The run id of `job_id`: a UUIDv5 in the OID namespace, the same from every coordinator.
pub fn run_id(job_id: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("nightshift/{job_id}").as_bytes(),
    )
}

/// The facets these events use, with the version of each one's schema.
const FACET_VERSIONS: &[(&str, &str)] = &[
    ("SchemaDatasetFacet", "1-2-0"),
    ("SQLJobFacet", "1-1-0"),
    ("ErrorMessageRunFacet", "1-0-1"),
    ("OutputStatisticsOutputDatasetFacet", "1-0-2"),
    ("DataQualityAssertionsDatasetFacet", "1-1-0"),
];

fn facet(name: &str, mut body: Value) -> Value {
    let version = FACET_VERSIONS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("1-0-0", |(_, v)| v);
    body["_producer"] = json!(PRODUCER);
    body["_schemaURL"] = json!(format!("{SPEC}/facets/{version}/{name}.json#/$defs/{name}"));
    body
}

fn schema_facet(schema: &Schema) -> Value {
    let fields: Vec<Value> = schema
        .fields()
        .iter()
        .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
        .collect();
    facet("SchemaDatasetFacet", json!({ "fields": fields }))
}

/// `(namespace, name)` of a source, after OpenLineage's naming: `scheme://authority` and
/// the path for object storage, `file` and the path for local files, the catalog for an
/// Iceberg table.
fn source_dataset(source: &SourceSummary, catalog: &str) -> (String, String) {
    if source.format == SourceFormat::Iceberg {
        return (format!("iceberg://{catalog}"), source.location.clone());
    }
    match source.location.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            (format!("{scheme}://{authority}"), format!("/{path}"))
        }
        None => ("file".to_string(), source.location.clone()),
    }
}

/// The data-quality assertions of the checks' verdicts, each with its column when it names one.
fn assertions(written: &Written<'_>) -> Value {
    let list: Vec<Value> = written
        .checks
        .iter()
        .map(|check| {
            let mut assertion = json!({
                "assertion": check.name,
                "success": check.passed,
                "severity": check.severity,
                "actual": check.detail,
            });
            if let Some(spec) = written.check_specs.iter().find(|s| s.name == check.name)
                && let [column] = spec.columns.as_slice()
            {
                assertion["column"] = json!(column);
            }
            assertion
        })
        .collect();
    facet(
        "DataQualityAssertionsDatasetFacet",
        json!({ "assertions": list }),
    )
}

/// The OpenLineage `RunEvent` for `facts` at `event_time` (RFC 3339).
pub fn run_event(kind: EventType, facts: &RunFacts<'_>, event_time: &str) -> Value {
    let inputs: Vec<Value> = facts
        .inputs
        .iter()
        .map(|source| {
            let (namespace, name) = source_dataset(source, facts.catalog);
            json!({
                "namespace": namespace,
                "name": name,
                "facets": {"schema": schema_facet(&source.schema)},
            })
        })
        .collect();
    let mut output = json!({
        "namespace": format!("iceberg://{}", facts.catalog),
        "name": facts.table,
        "facets": {},
    });
    if let Some(schema) = facts.output_schema {
        output["facets"]["schema"] = schema_facet(schema);
    }
    if let Some(written) = &facts.written {
        if !written.checks.is_empty() {
            output["facets"]["dataQualityAssertions"] = assertions(written);
        }
        output["outputFacets"] = json!({"outputStatistics": facet(
            "OutputStatisticsOutputDatasetFacet",
            json!({"rowCount": written.rows, "size": written.bytes}),
        )});
    }
    let mut run_facets = json!({});
    if let Some(error) = facts.error {
        run_facets["errorMessage"] = facet(
            "ErrorMessageRunFacet",
            json!({"message": error, "programmingLanguage": "SQL"}),
        );
    }
    json!({
        "eventType": kind.as_str(),
        "eventTime": event_time,
        "producer": PRODUCER,
        "schemaURL": RUN_EVENT_SCHEMA,
        "run": {"runId": run_id(facts.job_id).to_string(), "facets": run_facets},
        "job": {
            "namespace": facts.namespace,
            "name": facts.pipeline,
            "facets": {"sql": facet("SQLJobFacet", json!({"query": facts.sql}))},
        },
        "inputs": inputs,
        "outputs": [output],
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::datatypes::{DataType, Field};

    use super::*;

    fn source(name: &str, format: SourceFormat, location: &str) -> SourceSummary {
        SourceSummary {
            name: name.into(),
            format,
            location: location.into(),
            files: 1,
            bytes: 10,
            schema: Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)])),
            snapshot_id: None,
            consumed: None,
            read: None,
            nothing_new: false,
        }
    }

    #[test]
    fn datasets_are_named_as_openlineage_names_them() {
        let cases = [
            (
                source("a", SourceFormat::Parquet, "s3://lake/raw/orders/"),
                ("s3://lake", "/raw/orders/"),
            ),
            (
                source("b", SourceFormat::Csv, "/data/in/*.csv"),
                ("file", "/data/in/*.csv"),
            ),
            (
                source("c", SourceFormat::Iceberg, "raw.events"),
                ("iceberg://prod", "raw.events"),
            ),
        ];
        for (source, (namespace, name)) in cases {
            assert_eq!(
                source_dataset(&source, "prod"),
                (namespace.to_string(), name.to_string())
            );
        }
    }

    #[test]
    fn an_end_event_carries_statistics_assertions_and_the_error() {
        let inputs = [source("orders", SourceFormat::Parquet, "/d/orders")];
        let schema = Schema::new(vec![Field::new("amount", DataType::Float64, true)]);
        let checks = [CheckResult {
            name: "positive".into(),
            severity: "error".into(),
            passed: false,
            failed_rows: 2,
            detail: String::new(),
            samples: Vec::new(),
            quarantined: false,
        }];
        let specs: Vec<CheckSpec> = vec![
            toml::from_str(
                "name = \"positive\"\ntype = \"range\"\ncolumns = [\"amount\"]\nmin = 0",
            )
            .unwrap(),
        ];
        let facts = RunFacts {
            namespace: "nightshift",
            job_id: "daily-2024-01-01",
            pipeline: "daily",
            sql: "SELECT 1",
            catalog: "nightshift",
            table: "analytics.daily",
            inputs: &inputs,
            output_schema: Some(&schema),
            written: Some(Written {
                rows: 7,
                bytes: 700,
                checks: &checks,
                check_specs: &specs,
            }),
            error: Some("check `positive` failed"),
        };
        let event = run_event(EventType::Fail, &facts, "2026-11-26T07:00:00Z");
        assert_eq!(event["eventType"], "FAIL");
        assert_eq!(
            event["run"]["runId"],
            run_id("daily-2024-01-01").to_string()
        );
        assert_ne!(run_id("daily-2024-01-01"), run_id("daily-2024-01-02"));
        let output = &event["outputs"][0];
        assert_eq!(output["outputFacets"]["outputStatistics"]["rowCount"], 7);
        assert_eq!(
            output["facets"]["dataQualityAssertions"]["assertions"][0],
            json!({"assertion": "positive", "success": false, "column": "amount", "severity": "error", "actual": ""})
        );
        assert_eq!(output["facets"]["schema"]["fields"][0]["type"], "Float64");
        assert_eq!(
            event["run"]["facets"]["errorMessage"]["message"],
            "check `positive` failed"
        );
        assert_eq!(event["inputs"][0]["namespace"], "file");
    }
}
