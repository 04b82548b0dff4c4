//! The coordinator process: consumes job submissions from RabbitMQ and runs each as a job.
//!
//! A submission is acked only when its job has ended (succeeded or failed, with the outcome
//! stored in Redis). A coordinator killed mid-job leaves the submission unacked, so the broker
//! hands it to the next coordinator, which runs the job again under the same id: the Iceberg
//! history stops a second commit and the task outputs recorded in Redis are reused.

use std::collections::HashMap;
use std::sync::Arc;

use nightshift_cluster::admin::{
    CatalogDependency, ObjectStoreDependency, RabbitDependency, Readiness, RedisDependency,
    serve_admin_with,
};
use nightshift_cluster::submission::JobSubmission;
use nightshift_cluster::{ClusterConfig, RabbitQueue, RedisState};
use nightshift_core::CoreError;
use nightshift_core::access::AccessPolicy;
use nightshift_core::ids::JobId;
use nightshift_core::transport::{Delivery, JobState, StateStore};
use tokio::sync::{Mutex, Semaphore};
use tracing::{debug, error, info, warn};

use crate::job::{JobEnv, JobError, JobOptions, outcome_json, run_job};

/// Tasks done, total, and per stage.
type Progress = (usize, usize, Vec<crate::StageCount>);

/// Submissions by job id of the jobs this coordinator is running.
type RunningJobs = HashMap<String, Vec<Box<dyn Delivery>>>;

/// Where and how the job API listens.
pub struct ApiOptions {
    pub listen: std::net::SocketAddr,
    /// Accepted bearer tokens and the callers they make; empty disables authentication.
    pub tokens: Vec<crate::clients::Token>,
    pub tls: Option<crate::api::TlsFiles>,
}

/// Runs jobs from the submission queue until the queue closes. At most `max_jobs` at once.
/// With `api`, also serves the gRPC job API.
pub async fn serve(
    config: &ClusterConfig,
    max_jobs: usize,
    api: Option<ApiOptions>,
) -> Result<(), CoreError> {
    serve_until(config, max_jobs, api, None, std::future::pending()).await
}

/// [`serve`] with the admin endpoint (`/metrics`, `/healthz`, `/readyz`) on `admin`, until
/// `shutdown` completes (SIGTERM). Then the coordinator stops taking submissions and
/// returns at once: the submissions of its running jobs stay unacked, so the broker hands
/// them to the next coordinator, which resumes those jobs from the task outputs recorded
/// in Redis.
pub async fn serve_until(
    config: &ClusterConfig,
    max_jobs: usize,
    api: Option<ApiOptions>,
    admin: Option<std::net::SocketAddr>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CoreError> {
    let (catalog, scratch) = config
        .install()
        .map_err(|e| CoreError::Transport(e.to_string()))?;
    let access = Arc::new(
        config
            .access
            .policy()
            .map_err(|e| CoreError::Transport(e.to_string()))?,
    );
    if !access.restricts_locations() {
        warn!(
            "[access] locations is empty: submitted pipelines may read any location this coordinator can"
        );
    }
    let queue = Arc::new(RabbitQueue::connect(&config.rabbitmq).await?);
    // A submission stays unacked while its job runs: the broker must hand over as many as
    // the jobs run at once, not the workers' prefetch.
    queue.set_job_prefetch(max_jobs);
    let state = Arc::new(RedisState::connect(&config.redis.url, &config.redis.prefix).await?);
    let env = JobEnv {
        lease_ttl: config.redis.lease_ttl(),
        late_sweep_after: config.storage.late_sweep_after(),
        plan_mode: nightshift_core::planner::PlanMode::Distributed {
            task_memory: Some(config.worker_memory().per_task()),
        },
        ..JobEnv::new(queue.clone(), state.clone(), catalog, scratch)
    };
    let readiness = Readiness::new(vec![
        Arc::new(RabbitDependency(queue.clone())),
        Arc::new(RedisDependency(state.clone())),
        Arc::new(ObjectStoreDependency(env.scratch.clone())),
        Arc::new(CatalogDependency::new(env.catalog.clone())),
    ]);
    if let Some(addr) = admin {
        let tokens = api.as_ref().map(|a| a.tokens.clone()).unwrap_or_default();
        let reports =
            crate::report_http::report_routes(state.clone(), crate::api::TokenAuth::new(tokens));
        serve_admin_with(addr, readiness.clone(), reports).await?;
    }
    // After the recorder is installed (by the admin endpoint), or the series go nowhere.
    nightshift_core::metrics::register_coordinator();
    spawn_queue_sampler(queue.clone());
    let mut api_server = None;
    if let Some(api) = api {
        let service = crate::api::JobApi::new(
            queue.clone(),
            state.clone(),
            access.clone(),
            env.catalog.clone(),
        );
        let auth = crate::api::TokenAuth::new(api.tokens);
        let server = crate::api::bind_api(api.listen, service, auth, api.tls)
            .await
            .map_err(|e| CoreError::Transport(format!("job API: {e}")))?;
        api_server = Some(tokio::spawn(server));
    }
    info!(jobs_queue = %queue.jobs_queue(), max_jobs, "coordinator ready");
    spawn_sweepers(env.clone(), state.clone(), config.storage.scratch_ttl());
    let slots = Arc::new(Semaphore::new(max_jobs.max(1)));
    // Submissions of running jobs, acked when the job ends. A broker restart redelivers the
    // submission of a job this coordinator is still running; it joins the list instead of
    // starting the job twice.
    let running: Arc<Mutex<RunningJobs>> = Arc::default();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore open"),
            () = &mut shutdown => return stop_taking_jobs(&queue, &readiness, &running).await,
        };
        // A coordinator whose API died must not go on looking healthy: it stops, and its
        // supervisor (Kubernetes) restarts it.
        let next = tokio::select! {
            next = queue.next_job() => next,
            why = api_stopped(&mut api_server) => {
                error!(error = %why, "job API stopped; coordinator stopping");
                return Err(CoreError::Transport(format!("job API stopped: {why}")));
            }
            () = &mut shutdown => return stop_taking_jobs(&queue, &readiness, &running).await,
        };
        let Some(delivery) = next? else {
            info!("submission queue closed; coordinator stopping");
            return Ok(());
        };
        let submission: JobSubmission = match serde_json::from_slice(delivery.payload()) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "undecodable job submission dead-lettered");
                delivery.nack(false).await?;
                continue;
            }
        };
        if stopped_too_often(delivery.redeliveries()) {
            give_up_on_submission(&state, &submission.job_id, delivery.redeliveries()).await;
            if let Err(e) = delivery.ack().await {
                warn!(job_id = %submission.job_id, error = %e, "cannot ack the submission given up on");
            }
            continue;
        }
        {
            let mut running = running.lock().await;
            if let Some(deliveries) = running.get_mut(&submission.job_id) {
                info!(job_id = %submission.job_id, "job already running here; submission joins it");
                deliveries.push(delivery);
                continue;
            }
            running.insert(submission.job_id.clone(), vec![delivery]);
        }
        let env = env.clone();
        let state = state.clone();
        let running = running.clone();
        let access = access.clone();
        tokio::spawn(async move {
            let job_id = submission.job_id.clone();
            let outcome = run_submission(&env, &state, &access, submission).await;
            // Tests hold the report back to see a client find the commit first.
            if let Some(ms) = fail::eval("coordinator-report-delay", |ms| {
                ms.and_then(|ms| ms.parse::<u64>().ok())
            })
            .flatten()
            {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            store_outcome(&state, &job_id, outcome.as_ref()).await;
            let deliveries = running.lock().await.remove(&job_id).unwrap_or_default();
            for delivery in deliveries {
                if let Err(e) = delivery.ack().await {
                    warn!(job_id, error = %e, "cannot ack the submission");
                }
            }
            drop(permit);
        });
    }
}

/// Deliveries of one submission after which it is given up on: each coordinator that took
/// it before stopped while running it (redeliveries count the coordinators that stopped).
pub const MAX_SUBMISSION_DELIVERIES: u32 = 5;

/// Whether a submission delivered `redeliveries` times before is given up on instead of run:
/// a job whose planning stops the process (a crash in a library, the memory it asks for)
/// would otherwise stop every coordinator that takes it, again after each restart. A job
/// that committed before a coordinator stopped ends at once on its next delivery (it finds
/// its snapshot), so only a job that keeps stopping coordinators gets here.
pub fn stopped_too_often(redeliveries: u32) -> bool {
    redeliveries >= MAX_SUBMISSION_DELIVERIES - 1
}

/// Records the job of a submission [`stopped_too_often`] as failed, saying why.
async fn give_up_on_submission(state: &Arc<RedisState>, job_id: &str, redeliveries: u32) {
    let message = format!(
        "the submission was delivered {} times and each coordinator that took it stopped while running it; \
         it is not run again (its SQL or settings may stop the coordinator). Nothing was committed by this delivery; \
         the table's history shows whether an earlier one did",
        redeliveries + 1
    );
    error!(job_id, %message, "giving up on a submission");
    if let Ok(job) = JobId::parse(job_id)
        && let Err(e) = state.set_job_state(&job, JobState::Failed, &message).await
    {
        warn!(job_id, error = %e, "cannot record the job given up on");
    }
    let error = JobError::Internal(CoreError::Transport(message));
    store_outcome(state, job_id, Err(&error)).await;
}

/// Records as failed a job whose submission no longer passes admission when a coordinator
/// takes it (a source swapped for a link out of the allowed locations after the API
/// admitted it). Its report alone left it `queued` for good in `GetJob` and `status`. A job
/// that has already ended keeps its state ([`refusal_ends_the_job`]).
async fn fail_job_refused_at_start(state: &RedisState, job: &JobId, error: &JobError) {
    let recorded = match state.job_state(job).await {
        Ok(recorded) => recorded.map(|(s, _)| s),
        Err(e) => {
            warn!(job_id = %job, error = %e, "cannot read the state of a refused job");
            return;
        }
    };
    if !refusal_ends_the_job(recorded) {
        return;
    }
    if let Err(e) = state
        .set_job_state(job, JobState::Failed, &error.to_string())
        .await
    {
        warn!(job_id = %job, error = %e, "cannot record the refused job as failed");
    }
}

/// Whether a refusal at the start of a run ends a job `recorded` in that state: not one that
/// has ended already (a submission delivered again after its job committed keeps
/// `succeeded`, as nothing after a landed commit may report the job as failed).
pub fn refusal_ends_the_job(recorded: Option<JobState>) -> bool {
    !recorded.is_some_and(JobState::is_terminal)
}

/// Counts a job's end in the metrics and stores its outcome (the report clients wait for).
/// A failure is not stored over the report of a job that succeeded.
async fn store_outcome(
    state: &RedisState,
    job_id: &str,
    outcome: Result<&crate::JobReport, &JobError>,
) {
    let json = outcome_json(job_id, outcome);
    let finished = match json["status"].as_str() {
        Some("succeeded") => "succeeded",
        _ => json["kind"].as_str().unwrap_or("failed"),
    };
    nightshift_core::metrics::job_finished(finished);
    let Ok(job) = JobId::parse(job_id) else {
        return;
    };
    if outcome.is_err()
        && let Ok(Some((JobState::Succeeded, _))) = state.job_state(&job).await
    {
        warn!(
            job_id,
            "a later delivery of a job that succeeded failed; its report is kept"
        );
        return;
    }
    if let Err(e) = state.set_report(&job, &json.to_string()).await {
        warn!(job_id, error = %e, "cannot store the job outcome");
    }
}

async fn run_submission(
    env: &JobEnv,
    state: &Arc<RedisState>,
    access: &AccessPolicy,
    submission: JobSubmission,
) -> Result<crate::JobReport, JobError> {
    let job_id =
        JobId::parse(&submission.job_id).map_err(|e| JobError::Invalid(CoreError::Protocol(e)))?;
    // Tests stop the process here, as a crash while planning a job's SQL did.
    fail::fail_point!(
        "coordinator-abort-while-admitting",
        |_| std::process::abort()
    );
    let spec = match crate::admission::admit(&submission, access).await {
        Ok(spec) => spec,
        Err(refusal) => {
            let error = JobError::Invalid(refusal.into());
            fail_job_refused_at_start(state, &job_id, &error).await;
            return Err(error);
        }
    };
    let options = JobOptions::new(job_id, 1);
    info!(job_id = %options.job_id, pipeline = %spec.spec.pipeline.name, "job accepted");
    let submitted = nightshift_cluster::redis_state::Submitted {
        pipeline: &spec.spec.pipeline.name,
        owner: submission.client.as_deref(),
    };
    keep_submitter(state, &options.job_id, &submitted).await;
    // Progress goes to Redis from one writer task, latest value first, so a slow write never
    // holds up the job and writes never land out of order.
    let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(None::<Progress>);
    let job = options.job_id.clone();
    let progress_state = state.clone();
    tokio::spawn(async move {
        while progress_rx.changed().await.is_ok() {
            let latest = progress_rx.borrow_and_update().clone();
            if let Some((done, total, stages)) = latest {
                let stages = serde_json::to_string(&stages).unwrap_or_default();
                if let Err(e) = progress_state
                    .set_progress(&job, done, total, &stages)
                    .await
                {
                    warn!(job_id = %job, error = %e, "cannot record progress");
                }
            }
        }
    });
    let counted = std::sync::atomic::AtomicUsize::new(0);
    let record = std::sync::Mutex::new(None);
    let on_event = |event: crate::JobEvent| {
        let progress = match event {
            crate::JobEvent::Planned { tasks, stages } => Some((0, tasks, stages)),
            crate::JobEvent::TaskFinished {
                done,
                total,
                stages,
                ..
            } => {
                let before = counted.fetch_max(done, std::sync::atomic::Ordering::SeqCst);
                nightshift_core::metrics::tasks_completed(done.saturating_sub(before) as u64);
                Some((done, total, stages))
            }
            crate::JobEvent::Committing { .. } => None,
            crate::JobEvent::Finished(ended) => {
                *record.lock().expect("record lock") = Some(ended);
                None
            }
        };
        if progress.is_some() {
            let _ = progress_tx.send(progress);
        }
    };
    let result = run_job(env, &spec, &options, &on_event).await;
    let ended = record.lock().expect("record lock").take();
    if let Some(ended) = ended {
        // The report page's data; a job whose record cannot be stored still ended as it did.
        match serde_json::to_string(&ended) {
            Ok(json) => {
                if let Err(e) = state.set_run_record(&options.job_id, &json).await {
                    warn!(job_id = %options.job_id, error = %e, "cannot store the job's report record");
                }
            }
            Err(e) => warn!(error = %e, "cannot serialize the job's report record"),
        }
    }
    keep_submitter(state, &options.job_id, &submitted).await;
    result
}

/// Writes the job's owner and pipeline into its record again, in case Redis lost the record
/// and state changes wrote it anew without them (then the job was the shared namespace's
/// to see, and not its owner's, until this). A job whose record cannot be written still runs.
async fn keep_submitter(
    state: &RedisState,
    job: &JobId,
    submitted: &nightshift_cluster::redis_state::Submitted<'_>,
) {
    if let Err(e) = state.keep_submitter(job, submitted).await {
        warn!(job_id = %job, error = %e, "cannot record who submitted the job");
    }
}

/// Completes with the reason when the job API server ends; never without one.
async fn api_stopped(
    server: &mut Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
) -> String {
    match server.as_mut() {
        Some(server) => match server.await {
            Ok(Ok(())) => "it ended".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        },
        None => std::future::pending().await,
    }
}

/// A graceful stop: unready, no more submissions; running jobs are left to the next
/// coordinator (their submissions go back to the queue when this process's connection
/// closes).
async fn stop_taking_jobs(
    queue: &RabbitQueue,
    readiness: &Readiness,
    running: &Mutex<RunningJobs>,
) -> Result<(), CoreError> {
    readiness.start_draining();
    if let Err(e) = queue.stop_consuming_jobs().await {
        warn!(error = %e, "cannot cancel the submission consumer");
    }
    let jobs: Vec<String> = running.lock().await.keys().cloned().collect();
    info!(
        running = jobs.len(),
        jobs = ?jobs,
        "shutdown requested; no new jobs taken; running jobs are left to the next coordinator"
    );
    Ok(())
}

/// Samples the depth and consumers of the task, submission and dead-letter queues every
/// few seconds, for the metrics.
fn spawn_queue_sampler(queue: Arc<RabbitQueue>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            for (label, name) in [
                ("tasks", queue.tasks_queue()),
                ("jobs", queue.jobs_queue()),
                ("dead", queue.dead_queue()),
            ] {
                match queue.queue_stats(&name).await {
                    Ok((messages, consumers)) => {
                        nightshift_core::metrics::queue_sampled(label, messages, consumers)
                    }
                    Err(e) => debug!(queue = %name, error = %e, "cannot sample the queue"),
                }
            }
        }
    });
}

/// Late sweeps every few seconds; abandoned job scratch now and then every hour.
fn spawn_sweepers(env: JobEnv, state: Arc<RedisState>, scratch_ttl: std::time::Duration) {
    let late = env.clone();
    tokio::spawn(async move {
        let every = (late.late_sweep_after / 3).max(std::time::Duration::from_secs(1));
        let mut every = tokio::time::interval(every);
        loop {
            every.tick().await;
            if let Err(e) = crate::cleanup::run_late_sweeps(&late, crate::job::now_ms()).await {
                warn!(error = %e, "late sweep failed");
            }
        }
    });
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            every.tick().await;
            match crate::cleanup::sweep_scratch(&env.scratch, state.as_ref(), scratch_ttl).await {
                Ok(swept) if !swept.is_empty() => {
                    info!(jobs = ?swept, "swept abandoned job scratch")
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "scratch sweep failed"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_submission_is_given_up_on_at_its_fifth_delivery() {
        for redeliveries in 0..4 {
            assert!(!stopped_too_often(redeliveries), "{redeliveries}");
        }
        assert!(stopped_too_often(4));
        assert!(stopped_too_often(40));
    }

    #[test]
    fn a_refusal_at_the_start_of_a_run_ends_only_a_job_that_has_not_ended() {
        for open in [
            None,
            Some(JobState::Queued),
            Some(JobState::Running),
            Some(JobState::Committing),
        ] {
            assert!(refusal_ends_the_job(open), "{open:?}");
        }
        for ended in [JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
            assert!(!refusal_ends_the_job(Some(ended)), "{ended:?}");
        }
    }
}
