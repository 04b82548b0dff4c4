//! Checks on all the result's rows together (`unique`, `sql`, `freshness`, `relationship`)
//! and checks on sources run as more stages of the job, on its workers: each check's query
//! ([`CheckSpec::set_query`], [`CheckSpec::source_query`]) is planned over the job's
//! written, not yet committed data files (the table `result`) or over the sources as the job
//! reads them, like any job — a `unique` check groups through a hash shuffle, so
//! each task counts the duplicate keys of its share of the keys — and its stages get ids of
//! their own, numbered on from the job's highest ([`renumber_stages`]). The last stage's tasks count their rows and return a
//! few samples ([`v1::RowsOutput`]); the coordinator sums the counts. No row of the result
//! travels to the coordinator but those samples.
//!
//! The stages run under the job's id: its result queue, task records, leases, scratch and
//! cleanup are the job's. A restarted coordinator resumes them from the recorded winners,
//! as it does the job's own stages.

use std::time::Instant;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::prelude::SessionContext;
use nightshift_core::checks::{SAMPLES, count_column};
use nightshift_core::ids::JobId;
use nightshift_core::planner::{PlanOptions, plan_job, renumber_stages};
use nightshift_core::session::{SessionOptions, new_session};
use nightshift_proto::v1::{self, task_definition};
use nightshift_spec::CheckSpec;
use tracing::info;

use super::ownership::Ownership;
use super::record::{StageSummary, TaskSpan, keep_span, stage_summaries};
use super::stages::StageRunner;
use super::{JobEnv, JobError, set_partitions};
use crate::scheduler::StageTracker;

/// What the set checks need of the job.
pub(super) struct SetCheckRun<'a> {
    pub env: &'a JobEnv,
    pub job: &'a JobId,
    pub ownership: &'a Ownership,
    pub started: Instant,
    pub max_attempts: u32,
    /// Tasks per shuffle stage (the job's partition count).
    pub partitions: usize,
    /// The job's highest stage id: the checks' stages are numbered on from it, in the same
    /// order on every run of the job (a restarted coordinator finds their recorded winners).
    pub highest_stage: u32,
}

/// What the set checks did, for the job's report.
#[derive(Default)]
pub(super) struct Ran {
    pub outcomes: Vec<v1::CheckOutcome>,
    pub stages: Vec<StageSummary>,
}

impl SetCheckRun<'_> {
    /// Runs each check on a source (`on = "<source>"`) on the workers, in turn, over the
    /// sources as `session` (the job's planning session) registered them: before any task
    /// of the job. Their task attempts join `timeline`.
    pub async fn run_on_sources(
        &mut self,
        session: &SessionContext,
        checks: &[CheckSpec],
        catalog: &dyn iceberg::Catalog,
        timeline: &mut Vec<TaskSpan>,
    ) -> Result<Ran, JobError> {
        let mut ran = Ran::default();
        for check in checks.iter().filter(|c| !c.on_result()) {
            let Some(query) = nightshift_core::checks::source_check_query(session, check).await?
            else {
                continue;
            };
            self.run_query(session, check, &query, catalog, timeline, &mut ran)
                .await?;
        }
        Ok(ran)
    }

    /// Runs each check on all the result's rows of `checks` on the workers over the data
    /// files at `files` (rows of `schema`), in turn; their task attempts join `timeline`.
    pub async fn run_on_result(
        &mut self,
        checks: &[CheckSpec],
        files: &[String],
        schema: &SchemaRef,
        catalog: &dyn iceberg::Catalog,
        timeline: &mut Vec<TaskSpan>,
    ) -> Result<Ran, JobError> {
        let queries = nightshift_core::checks::result_set_queries(checks);
        if queries.is_empty() {
            return Ok(Ran::default());
        }
        if files.is_empty() {
            // Nothing was written: the queries run on no rows, here.
            let outcomes =
                nightshift_core::checks::run_set_checks(checks, files, schema, Some(catalog))
                    .await?;
            return Ok(Ran {
                outcomes,
                stages: Vec::new(),
            });
        }
        let mut ran = Ran::default();
        for (check, query) in queries {
            let session = new_session(SessionOptions::default());
            set_partitions(&session, self.partitions.max(1));
            session
                .register_table(
                    nightshift_spec::RESULT,
                    nightshift_core::sources::parquet_files_table(files, schema)?,
                )
                .map_err(|e| invalid(check, e.to_string()))?;
            self.run_query(&session, check, &query, catalog, timeline, &mut ran)
                .await?;
        }
        Ok(ran)
    }

    /// Plans `check`'s `query` in `session`, runs its stages on the workers (numbered after
    /// the highest so far) and adds its outcome and stages to `ran`.
    async fn run_query(
        &mut self,
        session: &SessionContext,
        check: &CheckSpec,
        query: &str,
        catalog: &dyn iceberg::Catalog,
        timeline: &mut Vec<TaskSpan>,
        ran: &mut Ran,
    ) -> Result<(), JobError> {
        if let Some(to) = &check.to {
            nightshift_core::sources::register_table_snapshot(
                session,
                nightshift_spec::RELATIONSHIP_VIEW,
                to,
                Some(catalog),
            )
            .await
            .map_err(|e| invalid(check, e.to_string()))?;
        }
        let options = PlanOptions {
            mode: self.env.plan_mode,
            partition_by: Vec::new(),
        };
        let plan = plan_job(session, self.job, query, &options)
            .await
            .map_err(|e| invalid(check, e.to_string()))?;
        let plan = renumber_stages(plan, self.highest_stage)?;
        self.highest_stage = plan
            .stages
            .iter()
            .map(|s| s.id.0)
            .max()
            .unwrap_or(self.highest_stage);
        let output = task_definition::Output::Rows(v1::RowsOutput {
            samples: SAMPLES as u32,
            count_column: count_column(check).to_string(),
        });
        let mut runner = StageRunner::new(
            self.env,
            self.job,
            self.ownership,
            output,
            StageTracker::new(&plan, self.max_attempts, plan.fingerprint()?),
            self.started,
        );
        let finished = runner.run(&|_| {}).await;
        ran.stages.extend(
            stage_summaries(&runner.tracker, &runner.timeline)
                .into_iter()
                .map(|stage| StageSummary {
                    check: Some(check.name.clone()),
                    ..stage
                }),
        );
        for span in runner.timeline.drain(..) {
            keep_span(timeline, span);
        }
        finished?;
        let (failed, samples) = runner.tracker.final_returned(SAMPLES);
        info!(check = %check.name, on = %check.on, stages = plan.stages.len(), failed, "check ran on the workers");
        ran.outcomes.push(v1::CheckOutcome {
            name: check.name.clone(),
            failed,
            samples,
        });
        Ok(())
    }
}

/// A check whose query cannot run, as a spec error naming it.
fn invalid(check: &CheckSpec, message: String) -> JobError {
    JobError::Invalid(nightshift_core::CoreError::Target {
        table: check.on.clone(),
        message: format!("[[check]] `{}`: {message}", check.name),
    })
}
