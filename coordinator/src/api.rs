//! The gRPC job API (`nightshift.v1.JobService`), served by the coordinator process next to
//! its submission consumer. Jobs are submitted to the same RabbitMQ submission queue
//! `nightshift run --cluster` uses; their records live in Redis.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use nightshift_cluster::poll::poll_delay;
use nightshift_cluster::redis_state::Submitted;
use nightshift_cluster::submission::JobSubmission;
use nightshift_cluster::{RabbitQueue, RedisState};
use nightshift_core::access::AccessPolicy;
use nightshift_core::ids::JobId;
use nightshift_core::redact::redact;
use nightshift_core::table::CatalogConfig;
use nightshift_core::transport::{JobState as DomainState, StateStore};
use nightshift_proto::v1::job_service_server::{JobService, JobServiceServer};
use nightshift_proto::v1::{
    GetJobRequest, Job, JobState, ListJobsRequest, ListJobsResponse, StageProgress,
    SubmitJobRequest, SubmitJobResponse,
};
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn};

use crate::admission::{RecentTables, Refusal, admit};
use crate::clients::{Caller, Token};
use crate::idempotency::{
    ChosenIdDecision, KeyBinding, KeyDecision, decide, decide_chosen_id, needs_republish,
};
use crate::job::{JobError, check_submission};
use crate::spec_ref::{SpecRefError, read_spec};

/// Largest spec plus SQL files accepted in one submission. The one size limit: a request
/// over it gets `RESOURCE_EXHAUSTED`, whether the handler or the transport notices.
pub const MAX_SUBMISSION_BYTES: usize = 1 << 20;

/// Longest idempotency key accepted: it is a Redis key and is quoted in refusals.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 512;

/// The JobService implementation.
#[derive(Clone)]
pub struct JobApi {
    queue: Arc<RabbitQueue>,
    state: Arc<RedisState>,
    access: Arc<AccessPolicy>,
    catalog: CatalogConfig,
    /// The catalog, opened by the first submission and shared by all after it.
    opened: Arc<tokio::sync::OnceCell<Arc<dyn iceberg::Catalog>>>,
    /// Target tables looked up by the last second's submissions.
    recent_tables: Arc<RecentTables>,
}

impl JobApi {
    pub fn new(
        queue: Arc<RabbitQueue>,
        state: Arc<RedisState>,
        access: Arc<AccessPolicy>,
        catalog: CatalogConfig,
    ) -> Self {
        JobApi {
            queue,
            state,
            access,
            catalog,
            opened: Arc::default(),
            recent_tables: Arc::default(),
        }
    }

    /// The catalog submissions are validated against, opened once.
    async fn open_catalog(&self) -> Result<Arc<dyn iceberg::Catalog>, Status> {
        self.opened
            .get_or_try_init(|| nightshift_core::table::open_catalog(&self.catalog))
            .await
            .cloned()
            .map_err(unavailable)
    }

    /// Registers `job` (state `queued`) and puts its submission on the submission queue.
    /// A job that could not be queued is forgotten again.
    async fn queue_job(
        &self,
        job: &JobId,
        submission: &JobSubmission,
        pipeline: &str,
    ) -> Result<(), Status> {
        let submitted = Submitted {
            pipeline,
            owner: submission.client.as_deref(),
        };
        self.state
            .register_job(job, &submitted, now_ms(), &submission.request_digest())
            .await
            .map_err(unavailable)?;
        let submission = JobSubmission {
            job_id: job.to_string(),
            ..submission.clone()
        };
        let payload = serde_json::to_vec(&submission).map_err(unavailable)?;
        let published = async {
            fail::fail_point!("api-publish", |_| Err(
                nightshift_core::CoreError::Transport(
                    "injected: the submission queue refused the job".into()
                )
            ));
            self.queue
                .publish_to(&self.queue.jobs_queue(), &payload)
                .await
        }
        .await;
        if let Err(e) = published {
            if let Err(forget) = self.state.forget_job(job, submitted.owner).await {
                warn!(job_id = %job, error = %forget, "cannot forget an unqueued job");
            }
            return Err(unavailable(format!("cannot queue the job: {e}")));
        }
        self.state.mark_published(job).await.map_err(unavailable)
    }

    /// Queues the job of an existing key binding again when the request that bound it
    /// never queued it (its process died in between).
    async fn requeue_if_lost(
        &self,
        binding: &KeyBinding,
        submission: &JobSubmission,
        pipeline: &str,
    ) -> Result<(), Status> {
        let Ok(job) = JobId::parse(&binding.job) else {
            return Ok(());
        };
        let record = self.state.job_record(&job).await.map_err(unavailable)?;
        if needs_republish(binding, &record, now_ms()) {
            warn!(job_id = %job, "job of an idempotency key was never queued; queueing it now");
            self.queue_job(&job, submission, pipeline).await?;
        }
        Ok(())
    }

    /// Job `id` as `caller` may see it: another client's job is answered as no job at all.
    async fn job(&self, caller: &Caller, id: &str) -> Result<Job, Status> {
        let job = JobId::parse(id).map_err(|e| refuse(Code::InvalidArgument, e))?;
        let record = self.state.job_record(&job).await.map_err(unavailable)?;
        if !caller.may_see_record(&record) {
            return Err(refuse(Code::NotFound, format!("no job {id}")));
        }
        Ok(job_from_record(id, &record))
    }
}

/// Which job list `caller`'s pages go through: a named client's own (its page tokens count
/// only its jobs, and a page is not read through thousands of others'), else every job's.
fn own_list(caller: &Caller) -> Option<&str> {
    match caller {
        Caller::Client(name) => Some(name),
        Caller::Shared | Caller::Operator(_) => None,
    }
}

/// The caller the token interceptor found. A request that did not pass through it is
/// refused rather than taken for the shared namespace.
fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("the request was not authenticated"))
}

/// Every error the API returns that carries a message not written here is built here and
/// passed through the redactor: it may quote what the client sent (a location with
/// credentials in it) or what a service answered.
fn refuse(code: Code, message: impl std::fmt::Display) -> Status {
    Status::new(code, redact(&message.to_string()))
}

/// A store or queue this API depends on failed; the client may retry.
fn unavailable(e: impl std::fmt::Display) -> Status {
    refuse(Code::Unavailable, e)
}

/// The size refusal's words, the same whichever layer noticed (see `api_limits`).
pub(crate) fn too_large(size: impl std::fmt::Display) -> String {
    format!(
        "the request is {size} bytes; at most {MAX_SUBMISSION_BYTES} bytes (the spec and its files) are accepted"
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Builds the API message from a Redis job record (and its final report, if any).
fn job_from_record(id: &str, record: &HashMap<String, String>) -> Job {
    let field = |k: &str| record.get(k).cloned().unwrap_or_default();
    let number = |k: &str| field(k).parse::<u64>().unwrap_or(0);
    let report: serde_json::Value = serde_json::from_str(&field("report")).unwrap_or_default();
    let state = DomainState::parse(&field("state")).map_or(JobState::Unspecified, api_state);
    // The outcome is stored once cleanup is done; until then the job is still ending.
    let state = match (state, report["status"].as_str()) {
        (JobState::Succeeded | JobState::Failed, None) => JobState::Committing,
        (JobState::Cancelled, None) => JobState::Running,
        (s, _) => s,
    };
    Job {
        job_id: id.to_string(),
        pipeline: field("pipeline"),
        state: state as i32,
        tasks_done: number("tasks_done"),
        tasks_total: number("tasks_total"),
        rows: report["rows"].as_u64().unwrap_or(0),
        bytes: report["bytes"].as_u64().unwrap_or(0),
        snapshot_id: report["snapshot_id"].as_i64().unwrap_or(0),
        error: report["error"].as_str().unwrap_or_default().to_string(),
        submitted_at_ms: field("submitted_at").parse().unwrap_or(0),
        stages: serde_json::from_str::<Vec<crate::StageCount>>(&field("stages"))
            .unwrap_or_default()
            .into_iter()
            .map(|s| StageProgress {
                stage: s.stage,
                tasks_done: s.done as u64,
                tasks_total: s.total as u64,
            })
            .collect(),
    }
}

/// The API's name for a job state.
fn api_state(state: DomainState) -> JobState {
    match state {
        DomainState::Queued => JobState::Queued,
        DomainState::Running => JobState::Running,
        DomainState::Committing => JobState::Committing,
        DomainState::Succeeded => JobState::Succeeded,
        DomainState::Failed => JobState::Failed,
        DomainState::Cancelled => JobState::Cancelled,
    }
}

fn is_terminal(job: &Job) -> bool {
    matches!(
        JobState::try_from(job.state),
        Ok(JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    )
}

type JobStream = Pin<Box<dyn Stream<Item = Result<Job, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let caller = caller_of(&request)?;
        let mut request = request.into_inner();
        if !request.spec_uri.is_empty() {
            if !request.spec.is_empty() || !request.files.is_empty() {
                return Err(refuse(
                    Code::InvalidArgument,
                    "give either spec (with files) or spec_uri, not both",
                ));
            }
            let (spec, files) = read_spec(&request.spec_uri, &self.access, MAX_SUBMISSION_BYTES)
                .await
                .map_err(|e| {
                    let code = match &e {
                        SpecRefError::Access(_) => Code::PermissionDenied,
                        SpecRefError::TooLarge { .. } => Code::ResourceExhausted,
                        SpecRefError::Read { .. } if !e.is_not_found() => Code::Unavailable,
                        _ => Code::InvalidArgument,
                    };
                    refuse(code, e)
                })?;
            request.spec = spec;
            request.files = files.into_iter().collect();
        }
        let size = request.spec.len() + request.files.values().map(String::len).sum::<usize>();
        if size > MAX_SUBMISSION_BYTES {
            return Err(refuse(Code::ResourceExhausted, too_large(size)));
        }
        let submission = JobSubmission {
            job_id: String::new(),
            spec: request.spec,
            files: request.files.into_iter().collect(),
            params: request.params.into_iter().collect(),
            git_commit: Some(request.git_commit).filter(|c| !c.is_empty()),
            client: caller.owner().map(String::from),
        };
        let spec = admit(&submission, &self.access)
            .await
            .map_err(|refusal| match refusal {
                Refusal::Spec(e) => refuse(Code::InvalidArgument, e),
                Refusal::Denied(e) => refuse(Code::PermissionDenied, e),
            })?;
        let chosen = match request.job_id.as_str() {
            "" => None,
            id => Some(JobId::parse(id).map_err(|e| refuse(Code::InvalidArgument, e))?),
        };
        // `nightshift validate`'s checks as far as the logical plan: sources found,
        // contracts hold, the SQL's names and types resolve, the result fits the target
        // table. Nothing is written.
        let catalog = self.open_catalog().await?;
        match check_submission(&spec, catalog.as_ref(), &self.recent_tables).await {
            Ok(_) => {}
            Err(JobError::Invalid(e)) => return Err(refuse(Code::InvalidArgument, e)),
            Err(e) => return Err(refuse(Code::Unavailable, e)),
        }
        let key = request.idempotency_key;
        if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(refuse(
                Code::InvalidArgument,
                format!(
                    "the idempotency key is {} bytes; at most {MAX_IDEMPOTENCY_KEY_BYTES} are accepted",
                    key.len()
                ),
            ));
        }
        let digest = submission.request_digest();
        let job = match (&chosen, key.is_empty()) {
            (Some(chosen), _) => chosen.clone(),
            (None, true) => JobId::generate(),
            // Derived, not drawn: a retry the key's binding no longer answers (Redis was
            // flushed) runs under the same id, which the table knows as committed.
            (None, false) => {
                nightshift_cluster::submission::keyed_job_id(caller.owner(), &key, &digest)
            }
        };
        let pipeline = &spec.spec.pipeline.name;
        let binding = KeyBinding {
            job: job.to_string(),
            digest,
            bound_at_ms: now_ms(),
        };
        // A chosen id, or the one a key derives, may already be another client's job (a
        // client can choose any id). Job ids are one namespace (a table knows its commits
        // by id): refuse, and say nothing about that job.
        let record = match (&chosen, key.is_empty()) {
            (None, true) => HashMap::new(),
            _ => self.state.job_record(&job).await.map_err(unavailable)?,
        };
        if !record.is_empty() && !caller.may_see_record(&record) {
            let message = match &chosen {
                Some(_) => format!("job id `{job}` is taken by another client; choose another id"),
                None => format!(
                    "job id `{job}`, which idempotency key `{key}` gives this request, is taken by another client; use another key"
                ),
            };
            return Err(refuse(Code::AlreadyExists, message));
        }
        if chosen.is_some() {
            match decide_chosen_id(&record, &binding.digest) {
                ChosenIdDecision::Submit => {
                    // A rerun: the outcome of the run before is not this one's.
                    self.state.clear_report(&job).await.map_err(unavailable)?;
                }
                ChosenIdDecision::Existing => {
                    return Ok(Response::new(SubmitJobResponse {
                        job_id: job.to_string(),
                        created: false,
                    }));
                }
                ChosenIdDecision::Ending { state } => {
                    return Err(refuse(
                        Code::FailedPrecondition,
                        format!(
                            "job `{job}` is still ending (state {state}, its run stopping its tasks and cleaning up); submit it again once it has ended (failed or cancelled)"
                        ),
                    ));
                }
                ChosenIdDecision::Conflict { state } => {
                    return Err(refuse(
                        Code::AlreadyExists,
                        format!(
                            "job `{job}` is {state} with another spec, SQL or parameters; a job id \
                             commits at most once: choose another id for another request"
                        ),
                    ));
                }
            }
        }
        let bound_as = binding.encode();
        if !key.is_empty() {
            let earlier = self
                .state
                .bind_idempotency_key(caller.owner(), &key, &bound_as)
                .await
                .map_err(unavailable)?
                .map(|text| KeyBinding::decode(&text));
            match decide(earlier.as_ref(), &binding.digest) {
                KeyDecision::Create => {}
                KeyDecision::Existing { job: existing } => {
                    let earlier = earlier.expect("an existing binding");
                    self.requeue_if_lost(&earlier, &submission, pipeline)
                        .await?;
                    return Ok(Response::new(SubmitJobResponse {
                        job_id: existing,
                        created: false,
                    }));
                }
                KeyDecision::Conflict { job: other } => {
                    return Err(refuse(
                        Code::AlreadyExists,
                        format!(
                            "idempotency key `{key}` was used for a different request (job {other}: \
                             another spec, SQL or parameters); use a new key for a new request"
                        ),
                    ));
                }
            }
        }
        if let Err(e) = self.queue_job(&job, &submission, pipeline).await {
            // Nothing was queued: free the key, so the client's retry starts afresh.
            if !key.is_empty()
                && let Err(unbind) = self
                    .state
                    .unbind_idempotency_key(caller.owner(), &key, &bound_as)
                    .await
            {
                warn!(error = %unbind, "cannot free the idempotency key of an unqueued job");
            }
            return Err(e);
        }
        info!(job_id = %job, pipeline = %pipeline, "job submitted");
        Ok(Response::new(SubmitJobResponse {
            job_id: job.to_string(),
            created: true,
        }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let caller = caller_of(&request)?;
        Ok(Response::new(
            self.job(&caller, &request.into_inner().job_id).await?,
        ))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = caller_of(&request)?;
        let id = request.into_inner().job_id;
        let first = self.job(&caller, &id).await?;
        let api = self.clone();
        let stream = async_stream_of_changes(api, caller, id, first);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let caller = caller_of(&request)?;
        let id = request.into_inner().job_id;
        let job = self.job(&caller, &id).await?;
        if !is_terminal(&job) {
            let job_id = JobId::parse(&id).map_err(|e| refuse(Code::InvalidArgument, e))?;
            self.state
                .request_cancel(&job_id)
                .await
                .map_err(unavailable)?;
            info!(job_id = %id, "cancel requested");
        }
        Ok(Response::new(self.job(&caller, &id).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let page_size = if request.page_size == 0 {
            50
        } else {
            request.page_size.min(500)
        } as usize;
        let mut offset: usize = if request.page_token.is_empty() {
            0
        } else {
            request
                .page_token
                .parse()
                .map_err(|_| refuse(Code::InvalidArgument, "bad page_token"))?
        };
        let mut jobs = Vec::new();
        // Scan in batches until the page is full or the list ends.
        loop {
            let ids = self
                .state
                .list_jobs(own_list(&caller), offset, page_size)
                .await
                .map_err(unavailable)?;
            if ids.is_empty() {
                offset = 0;
                break;
            }
            for id in ids {
                offset += 1;
                let Ok(job_id) = JobId::parse(&id) else {
                    continue;
                };
                let record = self.state.job_record(&job_id).await.map_err(unavailable)?;
                // Another client's jobs, and one forgotten since it was listed, are not there.
                if !caller.may_see_record(&record) {
                    continue;
                }
                let job = job_from_record(&id, &record);
                let pipeline_ok = request.pipeline.is_empty() || job.pipeline == request.pipeline;
                let state_ok = request.state == 0 || job.state == request.state;
                if pipeline_ok && state_ok {
                    jobs.push(job);
                    if jobs.len() == page_size {
                        break;
                    }
                }
            }
            if jobs.len() == page_size {
                break;
            }
        }
        Ok(Response::new(ListJobsResponse {
            jobs,
            next_page_token: if offset == 0 {
                String::new()
            } else {
                offset.to_string()
            },
        }))
    }
}

/// The job each time it changes (read again after [`poll_delay`]), ending with its final state.
fn async_stream_of_changes(
    api: JobApi,
    caller: Caller,
    id: String,
    first: Job,
) -> impl Stream<Item = Result<Job, Status>> {
    futures::stream::unfold(
        (Some(first), None::<Job>, false),
        move |(pending, last, done)| {
            let id = id.clone();
            let api = api.clone();
            let caller = caller.clone();
            async move {
                if done {
                    return None;
                }
                let mut current = pending;
                let started = tokio::time::Instant::now();
                loop {
                    if let Some(job) = current.take()
                        && last.as_ref() != Some(&job)
                    {
                        let end = is_terminal(&job);
                        return Some((Ok(job.clone()), (None, Some(job), end)));
                    }
                    tokio::time::sleep(poll_delay(started.elapsed())).await;
                    match api.job(&caller, &id).await {
                        Ok(job) => current = Some(job),
                        Err(status) => return Some((Err(status), (None, last, true))),
                    }
                }
            }
        },
    )
}

/// Checks `authorization: Bearer <token>` against the configured tokens in constant time,
/// and says which [`Caller`] the token makes.
#[derive(Clone)]
pub struct TokenAuth {
    tokens: Arc<Vec<Token>>,
}

impl TokenAuth {
    pub fn new(tokens: Vec<Token>) -> Self {
        TokenAuth {
            tokens: Arc::new(
                tokens
                    .into_iter()
                    .filter(|t| !t.secret.is_empty())
                    .collect(),
            ),
        }
    }

    fn check(&self, request: &Request<()>) -> Result<Caller, Status> {
        // No token configured: the API is served without authentication (`--no-auth`; the
        // coordinator refuses to start with no tokens otherwise), as `http_caller` does.
        if self.tokens.is_empty() {
            return Ok(Caller::Shared);
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            // Constant messages: nothing in them to redact (and the redactor would mask the
            // word after "bearer").
            .ok_or_else(|| Status::unauthenticated("missing bearer token: set NIGHTSHIFT_TOKEN"))?;
        self.caller(presented)
            .ok_or_else(|| Status::unauthenticated("invalid bearer token"))
    }

    /// The caller `presented` makes, if it is one of the tokens. Every token is compared
    /// (in constant time), so the time taken does not tell which one matched.
    fn caller(&self, presented: &str) -> Option<Caller> {
        let mut found = None;
        for token in self.tokens.iter() {
            if constant_time_eq(token.secret.as_bytes(), presented.as_bytes()) {
                found = Some(token.caller.clone());
            }
        }
        found
    }

    /// Who an HTTP request with this `authorization` header reads job reports as: the
    /// shared namespace when no token is configured, else the caller of a configured token
    /// (`None`: not let in).
    pub fn http_caller(&self, authorization: Option<&str>) -> Option<Caller> {
        if self.tokens.is_empty() {
            return Some(Caller::Shared);
        }
        self.caller(authorization?.strip_prefix("Bearer ")?)
    }
}

/// Compares without an early exit, so the time taken does not tell how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// PEM files for serving the API over TLS; with `client_ca`, clients must present a
/// certificate it signed (mutual TLS).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
}

impl TlsFiles {
    fn server_config(&self) -> Result<tonic::transport::ServerTlsConfig, String> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let identity = tonic::transport::Identity::from_pem(read(&self.cert)?, read(&self.key)?);
        let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        Ok(config)
    }
}

/// Selects rustls' ring backend for the whole process. Several dependencies enable rustls
/// with different backends, so rustls cannot pick one itself; a second call does nothing.
pub fn install_rustls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The job API server, bound and configured, not yet serving.
pub type ApiServer = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// Binds `addr` and prepares the job API, gRPC health and reflection, over TLS when `tls` is
/// given. Errors in the address, certificates or keys surface here, at start, rather than
/// when the first client connects. The returned future serves until the process ends.
pub async fn bind_api(
    addr: SocketAddr,
    api: JobApi,
    auth: TokenAuth,
    tls: Option<TlsFiles>,
) -> Result<ApiServer, Box<dyn std::error::Error + Send + Sync>> {
    install_rustls_provider();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<JobApi>>().await;
    // Both reflection versions: grpcurl and older tools still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(nightshift_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let service = tonic::service::interceptor::InterceptedService::new(
        JobServiceServer::new(api).max_decoding_message_size(MAX_SUBMISSION_BYTES + 64 * 1024),
        move |mut request: Request<()>| {
            let caller = auth.check(&request)?;
            request.extensions_mut().insert(caller);
            Ok(request)
        },
    );
    let mut server = tonic::transport::Server::builder()
        .layer(crate::api_metrics::ApiMetricsLayer)
        .layer(crate::api_limits::one_size_limit_layer());
    if let Some(tls) = &tls {
        let config = tls.server_config().map_err(|e| format!("TLS: {e}"))?;
        server = server.tls_config(config)?;
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let mutual = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    info!(%addr, tls = tls.is_some(), mutual_tls = mutual, "job API listening");
    let router = server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service);
    Ok(Box::pin(router.serve_with_incoming(
        tonic::transport::server::TcpIncoming::from(listener),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(secret: &str, caller: Caller) -> Token {
        Token {
            secret: secret.into(),
            caller,
        }
    }

    #[test]
    fn without_tokens_every_call_is_let_in_and_with_them_only_a_bearer_of_one() {
        let bearing = |token: Option<&str>| {
            let mut request = Request::new(());
            if let Some(token) = token {
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            request
        };
        let open = TokenAuth::new(vec![]);
        assert_eq!(open.check(&bearing(None)).unwrap(), Caller::Shared);
        assert_eq!(
            open.check(&bearing(Some("anything"))).unwrap(),
            Caller::Shared
        );
        let alice = Caller::Client("alice".into());
        let guarded = TokenAuth::new(vec![
            token("tok-a", Caller::Shared),
            token("tok-alice", alice.clone()),
        ]);
        assert_eq!(
            guarded.check(&bearing(Some("tok-a"))).unwrap(),
            Caller::Shared
        );
        assert_eq!(guarded.check(&bearing(Some("tok-alice"))).unwrap(), alice);
        assert!(guarded.check(&bearing(Some("tok-b"))).is_err());
        assert!(guarded.check(&bearing(Some("tok-alic"))).is_err());
        assert!(guarded.check(&bearing(None)).is_err());
        assert_eq!(
            guarded.http_caller(Some("Bearer tok-alice")),
            Some(alice.clone())
        );
        assert_eq!(guarded.http_caller(Some("tok-alice")), None);
        assert_eq!(guarded.http_caller(None), None);
        assert_eq!(open.http_caller(None), Some(Caller::Shared));
        // An empty token in the list never lets an empty bearer in.
        assert!(
            TokenAuth::new(vec![token("", Caller::Shared), token("tok-a", alice)])
                .check(&bearing(Some("")))
                .is_err()
        );
    }

    #[test]
    fn constant_time_eq_compares_whole_tokens() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
