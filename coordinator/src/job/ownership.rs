//! One coordinator at a time runs a job.
//!
//! A job id may reach two coordinators (a submission redelivered while its first coordinator
//! still runs, or a user submitting the same id twice). The table's history already makes a
//! second commit impossible, but cleanup needs more: a coordinator sweeping "its job's
//! unreferenced files" must not race another coordinator that is about to commit files of the
//! same job id. So a job is run, committed and cleaned up only by the coordinator holding its
//! ownership in the state store: taken when free, renewed every third of its time to live,
//! released at the end. A second coordinator waits for it. A coordinator that finds its
//! ownership taken by another stops the job and leaves the cleanup to the owner.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nightshift_core::CoreError;
use nightshift_core::ids::JobId;
use nightshift_core::transport::StateStore;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::JobError;

/// This coordinator's hold on a job, renewed in the background while it lives.
pub(super) struct Ownership {
    state: Arc<dyn StateStore>,
    job: JobId,
    owner: String,
    ttl: Duration,
    lost: Arc<AtomicBool>,
    renewer: JoinHandle<()>,
}

impl Ownership {
    /// Takes ownership of `job`, waiting while another live coordinator holds it.
    pub(super) async fn acquire(
        state: Arc<dyn StateStore>,
        job: &JobId,
        owner: &str,
        ttl: Duration,
    ) -> Result<Self, JobError> {
        let mut waited = false;
        while !state
            .acquire_job(job, owner, ttl)
            .await
            .map_err(JobError::Internal)?
        {
            if !waited {
                info!("another coordinator runs this job; waiting until it ends or stops renewing");
                waited = true;
            }
            tokio::time::sleep(ttl / 3).await;
        }
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = tokio::spawn(renew(
            state.clone(),
            job.clone(),
            owner.to_string(),
            ttl,
            lost.clone(),
        ));
        Ok(Ownership {
            state,
            job: job.clone(),
            owner: owner.to_string(),
            ttl,
            lost,
            renewer,
        })
    }

    /// Renews now and tells whether this coordinator still owns the job. Asked right before
    /// the commit and before anything is deleted.
    pub(super) async fn still_held(&self) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return false;
        }
        match self
            .state
            .acquire_job(&self.job, &self.owner, self.ttl)
            .await
        {
            Ok(held) => {
                if !held {
                    self.lost.store(true, Ordering::SeqCst);
                }
                held
            }
            // The state store is unreachable: nobody else can have taken it meanwhile
            // without it, and the lease outlives this call by most of its time to live.
            Err(e) => {
                warn!(error = %e, "cannot renew job ownership");
                true
            }
        }
    }

    /// Whether the background renewal found the job taken by another coordinator.
    pub(super) fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// The error a job ends with when another coordinator took it over.
    pub(super) fn lost_error() -> JobError {
        JobError::Internal(CoreError::Transport(
            "another coordinator took over this job; it finishes it".into(),
        ))
    }

    pub(super) async fn release(self) {
        self.renewer.abort();
        if let Err(e) = self.state.release_job(&self.job, &self.owner).await {
            warn!(error = %e, "cannot release job ownership; it expires by itself");
        }
    }
}

async fn renew(
    state: Arc<dyn StateStore>,
    job: JobId,
    owner: String,
    ttl: Duration,
    lost: Arc<AtomicBool>,
) {
    loop {
        tokio::time::sleep(ttl / 3).await;
        match state.acquire_job(&job, &owner, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                warn!("job ownership taken by another coordinator; stopping");
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => warn!(error = %e, "cannot renew job ownership; retrying"),
        }
    }
}
