//! The coordinator's job report pages on its admin endpoint: `GET /jobs/{job}/report` draws
//! an ended job's record, or the progress of a job still queued or running. With API tokens
//! configured it asks for the same bearer token as the job API (the page holds sample rows).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use nightshift_cluster::redis_state::RedisState;
use nightshift_core::ids::JobId;
use tracing::warn;

use crate::api::TokenAuth;
use crate::clients::Caller;
use crate::job::record::RunRecord;
use crate::report_page::{render, render_progress};

#[derive(Clone)]
struct Reports {
    state: Arc<RedisState>,
    auth: TokenAuth,
}

/// The report routes, for the admin endpoint.
pub fn report_routes(state: Arc<RedisState>, auth: TokenAuth) -> Router {
    Router::new()
        .route("/jobs/{job}/report", get(job_report))
        .with_state(Reports { state, auth })
}

async fn job_report(
    State(reports): State<Reports>,
    Path(job): Path<String>,
    headers: HeaderMap,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(caller) = reports.auth.http_caller(authorization) else {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a job report needs the job API's bearer token\n",
        )
            .into_response();
    };
    let Ok(job) = JobId::parse(&job) else {
        return (StatusCode::BAD_REQUEST, "not a job id\n").into_response();
    };
    match page(&reports.state, &caller, &job).await {
        Ok(Some(html)) => {
            ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
        }
        Ok(None) => (StatusCode::NOT_FOUND, "no such job\n").into_response(),
        Err(e) => {
            warn!(job_id = %job, error = %e, "cannot read the job's record");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot read the job's record\n",
            )
                .into_response()
        }
    }
}

/// The page of `job`: its report once it ended, its progress before; `None` if unknown, or
/// another client's.
async fn page(
    state: &RedisState,
    caller: &Caller,
    job: &JobId,
) -> nightshift_core::Result<Option<String>> {
    let fields = state.job_record(job).await?;
    if !caller.may_see_record(&fields) {
        return Ok(None);
    }
    if let Some(json) = fields.get("run_record")
        && let Ok(record) = serde_json::from_str::<RunRecord>(json)
    {
        return Ok(Some(render(&record)));
    }
    let stages: Vec<crate::StageCount> = fields
        .get("stages")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let field = |name: &str| fields.get(name).map_or("", String::as_str);
    Ok(Some(render_progress(
        job.as_str(),
        field("pipeline"),
        field("state"),
        &stages,
    )))
}
