//! The coordinator: turns a pipeline spec into a job, schedules the job's tasks on a
//! [`TaskQueue`](nightshift_core::transport::TaskQueue), and commits the result as one
//! Iceberg snapshot.
//!
//! - [`job`] drives one job from spec to snapshot.
//! - [`scheduler`] tracks stages and task attempts and decides what to publish next.
//! - [`cleanup`] removes what a job wrote but did not commit.
//! - [`lineage`] says in each snapshot's summary how it was made.
//! - [`admission`] admits a submission (spec from what it carries, access policy, canonical
//!   locations), the same for the job API and the submission queue.
//! - [`api`] serves the gRPC job API ([`api_metrics`] counts its calls, [`api_limits`] keeps
//!   one size limit, [`idempotency`] decides what a key answers, [`clients`] who calls and
//!   which jobs they see); [`spec_ref`] reads specs submitted by reference.

pub mod admission;
pub mod api;
pub mod api_limits;
pub mod api_metrics;
pub mod cleanup;
pub mod clients;
pub mod idempotency;
pub mod job;
pub mod lineage;
pub mod openlineage;
pub mod report_http;
pub mod report_page;
pub mod scheduler;
pub mod service;
pub mod spec_ref;

pub use job::{
    JobEnv, JobError, JobEvent, JobOptions, JobReport, ValidationReport, check_submission,
    outcome_json, run_job, validate_job,
};
pub use scheduler::StageCount;
