//! The CLI side of the job API: `submit`, `status`, `watch`, `cancel`, `jobs`.

use std::path::Path;

use nightshift_cluster::submission::JobSubmission;
use nightshift_proto::v1::job_service_client::JobServiceClient;
use nightshift_proto::v1::{GetJobRequest, Job, JobState, ListJobsRequest, SubmitJobRequest};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Exit code of a cancelled job (0 succeeded, 1 failed, 2 rejected/invalid).
pub const EXIT_CANCELLED: u8 = 3;

/// Adds the bearer token to each request.
type AddToken = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Authenticated = InterceptedService<Channel, AddToken>;

/// An error and its causes, `outer: inner: innermost` ("transport error" alone says little).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What a failure below gRPC (no status from the server itself) most likely means. A
/// plain-text client talking to a TLS server sees an HTTP/2 or transport error; a TLS client
/// without the certificate a mutual-TLS server requires sees its connection closed.
pub fn transport_hint(status: &Status, server: &str) -> Option<&'static str> {
    let message = status.message();
    let below_grpc = [
        "h2 protocol error",
        "transport error",
        "operation was canceled",
        "connection reset",
        "broken pipe",
    ]
    .iter()
    .any(|m| message.contains(m));
    if !below_grpc {
        None
    } else if server.starts_with("https://") {
        Some(
            "the connection failed below gRPC: if the server requires mutual TLS, set NIGHTSHIFT_CLIENT_CERT and NIGHTSHIFT_CLIENT_KEY",
        )
    } else {
        Some(
            "the connection failed below gRPC: if the server serves TLS, use an https:// address (and NIGHTSHIFT_CA_CERT)",
        )
    }
}

/// A job API client that sends a bearer token.
pub type ApiClient = JobServiceClient<Authenticated>;

/// A connected client that sends `token` (if any) as a bearer token.
pub async fn connect(server: &str, token: Option<String>) -> Result<ApiClient, String> {
    let mut endpoint = Channel::from_shared(server.to_string())
        .map_err(|e| format!("bad server address `{server}`: {e}"))?;
    if server.starts_with("https://") {
        nightshift_coordinator::api::install_rustls_provider();
        endpoint = endpoint
            .tls_config(tls_from_env()?)
            .map_err(|e| format!("TLS settings: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach {server}: {}", with_causes(&e)))?;
    let header: Option<MetadataValue<_>> = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| "the token has characters not allowed in a header".to_string())?,
        ),
        None => None,
    };
    let interceptor: AddToken = Box::new(move |mut request: Request<()>| {
        if let Some(h) = &header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    });
    Ok(JobServiceClient::with_interceptor(channel, interceptor))
}

/// TLS settings from `NIGHTSHIFT_CA_CERT` and (mutual TLS) `NIGHTSHIFT_CLIENT_CERT` /
/// `NIGHTSHIFT_CLIENT_KEY`, all PEM files.
fn tls_from_env() -> Result<tonic::transport::ClientTlsConfig, String> {
    let read = |var: &str| -> Result<Option<Vec<u8>>, String> {
        match std::env::var(var) {
            Ok(path) => std::fs::read(&path)
                .map(Some)
                .map_err(|e| format!("{var}={path}: {e}")),
            Err(_) => Ok(None),
        }
    };
    let mut config = tonic::transport::ClientTlsConfig::new();
    if let Some(ca) = read("NIGHTSHIFT_CA_CERT")? {
        config = config.ca_certificate(tonic::transport::Certificate::from_pem(ca));
    }
    if let (Some(cert), Some(key)) = (
        read("NIGHTSHIFT_CLIENT_CERT")?,
        read("NIGHTSHIFT_CLIENT_KEY")?,
    ) {
        config = config.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Ok(config)
}

/// The token from `NIGHTSHIFT_TOKEN`, else from the file named by `NIGHTSHIFT_TOKEN_FILE`.
pub fn token_from_env() -> Result<Option<String>, String> {
    if let Ok(token) = std::env::var("NIGHTSHIFT_TOKEN") {
        return Ok(Some(token.trim().to_string()));
    }
    match std::env::var("NIGHTSHIFT_TOKEN_FILE") {
        Ok(path) => std::fs::read_to_string(&path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| format!("cannot read token file {path}: {e}")),
        Err(_) => Ok(None),
    }
}

/// The request for submitting `spec`: a local file, sent with the SQL file it names, or a
/// URL (`s3://…`) the coordinator reads itself.
pub fn submit_request(
    spec: &str,
    params: Vec<(String, String)>,
    idempotency_key: Option<String>,
) -> Result<SubmitJobRequest, String> {
    let idempotency_key = idempotency_key.unwrap_or_default();
    if spec.contains("://") {
        return Ok(SubmitJobRequest {
            spec_uri: spec.to_string(),
            params: params.into_iter().collect(),
            idempotency_key,
            ..Default::default()
        });
    }
    let path = Path::new(spec);
    let submission = JobSubmission::from_spec_file("", path, params)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(SubmitJobRequest {
        spec: submission.spec,
        files: submission.files.into_iter().collect(),
        params: submission.params.into_iter().collect(),
        idempotency_key,
        spec_uri: String::new(),
        git_commit: submission.git_commit.unwrap_or_default(),
        job_id: String::new(),
    })
}

pub fn get(job_id: &str) -> GetJobRequest {
    GetJobRequest {
        job_id: job_id.to_string(),
    }
}

/// A job state to list by (`nightshift jobs --state`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum StateFilter {
    Queued,
    Running,
    Committing,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateFilter> for JobState {
    fn from(state: StateFilter) -> Self {
        match state {
            StateFilter::Queued => JobState::Queued,
            StateFilter::Running => JobState::Running,
            StateFilter::Committing => JobState::Committing,
            StateFilter::Succeeded => JobState::Succeeded,
            StateFilter::Failed => JobState::Failed,
            StateFilter::Cancelled => JobState::Cancelled,
        }
    }
}

pub fn list(
    pipeline: Option<String>,
    state: Option<StateFilter>,
    limit: u32,
    page_token: Option<String>,
) -> ListJobsRequest {
    ListJobsRequest {
        pipeline: pipeline.unwrap_or_default(),
        state: state.map_or(JobState::Unspecified, JobState::from) as i32,
        page_size: limit,
        page_token: page_token.unwrap_or_default(),
    }
}

pub fn state_name(job: &Job) -> &'static str {
    match JobState::try_from(job.state).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "unknown",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Committing => "committing",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// One line describing a job.
pub fn describe(job: &Job) -> String {
    let mut line = format!(
        "{}  {:<10} {}  tasks {}/{}",
        job.job_id,
        state_name(job),
        job.pipeline,
        job.tasks_done,
        job.tasks_total
    );
    if !job.stages.is_empty() {
        let stages: Vec<String> = job
            .stages
            .iter()
            .map(|s| format!("{}:{}/{}", s.stage, s.tasks_done, s.tasks_total))
            .collect();
        line.push_str(&format!("  stages [{}]", stages.join(" ")));
    }
    if job.snapshot_id != 0 {
        line.push_str(&format!(
            "  snapshot {}  rows {}",
            job.snapshot_id, job.rows
        ));
    }
    if !job.error.is_empty() {
        line.push_str(&format!("  error: {}", job.error));
    }
    line
}

/// The exit code a scheduler sees for a finished job; `None` while it runs.
pub fn exit_code(job: &Job) -> Option<u8> {
    match JobState::try_from(job.state).unwrap_or(JobState::Unspecified) {
        JobState::Succeeded => Some(0),
        JobState::Failed => Some(1),
        JobState::Cancelled => Some(EXIT_CANCELLED),
        _ => None,
    }
}

/// How long `watch` and `submit --wait` keep following a job through a coordinator that does
/// not answer (a restart hands the job to the next coordinator; Redis may blip) before they
/// give up and exit 1. The budget starts again with every update received.
pub const FOLLOW_THROUGH_OUTAGE: std::time::Duration = std::time::Duration::from_secs(300);

/// Whether, and after how long, to watch a job again that has not finished when its watch
/// ended: `code` is the error that ended it (`None`: the server closed the stream, as a
/// coordinator shutting down does), `lost_for` how long no update has come, `attempt` the
/// retries so far, `seen` whether the job was seen before. Errors the server means (the
/// job is unknown, the token refused) end the watch; an unreachable or restarting
/// coordinator is waited for, up to [`FOLLOW_THROUGH_OUTAGE`]. So is a job seen before and
/// now unknown: a Redis restarted without its data lost the job's record, and the job goes
/// on (its coordinator records it again as it moves on or ends).
pub fn follow_again_after(
    code: Option<tonic::Code>,
    seen: bool,
    lost_for: std::time::Duration,
    attempt: u32,
) -> Option<std::time::Duration> {
    use tonic::Code;
    let transient = match code {
        None => true,
        Some(Code::NotFound) => seen,
        Some(
            Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted,
        ) => true,
        Some(_) => false,
    };
    if !transient || lost_for >= FOLLOW_THROUGH_OUTAGE {
        return None;
    }
    let backoff = std::time::Duration::from_millis(250) * 2u32.saturating_pow(attempt.min(5));
    Some(backoff.min(std::time::Duration::from_secs(5)))
}

#[cfg(test)]
mod follow_tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;

    #[test]
    fn a_restarting_coordinator_is_waited_for_with_a_growing_pause() {
        let pauses: Vec<_> = (0..8)
            .map(|attempt| {
                follow_again_after(Some(Code::Unavailable), true, Duration::ZERO, attempt)
            })
            .collect();
        assert_eq!(pauses[0], Some(Duration::from_millis(250)));
        assert_eq!(pauses[1], Some(Duration::from_millis(500)));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(pauses[7], Some(Duration::from_secs(5)));
        // A stream closed by a coordinator shutting down, or cut below gRPC.
        for code in [None, Some(Code::Unknown), Some(Code::Internal)] {
            assert!(follow_again_after(code, false, Duration::from_secs(60), 3).is_some());
        }
    }

    #[test]
    fn the_servers_own_refusals_and_a_long_outage_end_the_watch() {
        for code in [
            Code::NotFound,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::InvalidArgument,
        ] {
            assert_eq!(
                follow_again_after(Some(code), false, Duration::ZERO, 0),
                None
            );
        }
        assert_eq!(
            follow_again_after(Some(Code::Unavailable), true, FOLLOW_THROUGH_OUTAGE, 0),
            None
        );
    }

    #[test]
    fn a_job_seen_before_and_now_unknown_is_waited_for() {
        // Redis restarted without its data: the record comes back as the job moves on.
        assert_eq!(
            follow_again_after(Some(Code::NotFound), true, Duration::ZERO, 0),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            follow_again_after(Some(Code::NotFound), true, FOLLOW_THROUGH_OUTAGE, 0),
            None
        );
        for code in [Code::Unauthenticated, Code::PermissionDenied] {
            assert_eq!(
                follow_again_after(Some(code), true, Duration::ZERO, 0),
                None
            );
        }
    }
}
