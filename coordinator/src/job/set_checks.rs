//! Checks on all the result's rows together (`unique`, `sql`, `freshness`, `relationship`)
//! run as more stages of the job, on its workers: each check's query
//! ([`CheckSpec::set_query`]) is planned over the job's written, not yet committed data files
//! (the table `result`) like any job — a `unique` check groups through a hash shuffle, so
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
    /// Runs each set check of `checks` on the workers over the data files at `files` (rows of
    /// `schema`), in turn; their task attempts join `timeline`.
    pub async fn run(
        &self,
        checks: &[CheckSpec],
        files: &[String],
        schema: &SchemaRef,
        catalog: &dyn iceberg::Catalog,
        timeline: &mut Vec<TaskSpan>,
    ) -> Result<Ran, JobError> {
        let queries: Vec<(&CheckSpec, String)> = checks
            .iter()
            .filter(|c| c.on_result())
            .filter_map(|c| c.set_query().map(|q| (c, q)))
            .collect();
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
        let mut highest = self.highest_stage;
        for (check, query) in queries {
            let mut runner = self
                .runner(check, &query, files, schema, catalog, highest)
                .await?;
            highest = runner
                .tracker
                .stages()
                .iter()
                .map(|s| s.stage.id.0)
                .max()
                .unwrap_or(highest);
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
            info!(check = %check.name, stages = runner.tracker.stages().len(), failed, "check ran on the workers");
            ran.outcomes.push(v1::CheckOutcome {
                name: check.name.clone(),
                failed,
                samples,
            });
        }
        Ok(ran)
    }

    /// The stages of `check`'s `query` over the written files, ready to run.
    async fn runner(
        &self,
        check: &CheckSpec,
        query: &str,
        files: &[String],
        schema: &SchemaRef,
        catalog: &dyn iceberg::Catalog,
        after_stage: u32,
    ) -> Result<StageRunner<'_>, JobError> {
        let invalid = |message: String| {
            JobError::Invalid(nightshift_core::CoreError::Target {
                table: check.on.clone(),
                message: format!("[[check]] `{}`: {message}", check.name),
            })
        };
        let session = new_session(SessionOptions::default());
        set_partitions(&session, self.partitions.max(1));
        session
            .register_table(
                nightshift_spec::RESULT,
                nightshift_core::sources::parquet_files_table(files, schema)?,
            )
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(to) = &check.to {
            nightshift_core::sources::register_table_snapshot(
                &session,
                nightshift_spec::RELATIONSHIP_VIEW,
                to,
                Some(catalog),
            )
            .await
            .map_err(|e| invalid(e.to_string()))?;
        }
        let options = PlanOptions {
            mode: self.env.plan_mode,
            partition_by: Vec::new(),
        };
        let plan = plan_job(&session, self.job, query, &options)
            .await
            .map_err(|e| invalid(e.to_string()))?;
        let plan = renumber_stages(plan, after_stage)?;
        let output = task_definition::Output::Rows(v1::RowsOutput {
            samples: SAMPLES as u32,
            count_column: count_column(check).to_string(),
        });
        Ok(StageRunner::new(
            self.env,
            self.job,
            self.ownership,
            output,
            StageTracker::new(&plan, self.max_attempts),
            self.started,
        ))
    }
}
