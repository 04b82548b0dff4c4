//! A job as explicit phases — plan, run stages, commit — that all end in [`JobRun::finish`],
//! the one place where a job's outcome is recorded and its leftovers are cleaned up.
//!
//! The phases return an [`Ended`]; nothing after a commit can turn it into an error, so a job
//! whose snapshot landed is reported as succeeded even when its cleanup fails (the late sweep
//! retries the cleanup). A job found committed by an earlier run ends through the same path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iceberg::{Catalog, TableIdent};
use nightshift_core::CoreError;
use nightshift_core::ids::JobId;
use nightshift_core::storage::Location;
use nightshift_core::table::{
    CommitOutcome, JobCommit, SchemaChange, TableReferences, TargetLayout, WrittenWith,
    commit_job_snapshot, ensure_rejects_table, ensure_target, find_job_snapshot, open_catalog,
    parse_table_ident,
};
use nightshift_core::transport::JobState;
use nightshift_spec::ResolvedSpec;
use tracing::{Instrument, info, info_span, warn};

use super::ownership::Ownership;
use super::record::{RunRecord, StageSummary, TaskSpan, keep_span, stage_summaries};
use super::set_checks::SetCheckRun;
use super::stages::StageRunner;
use super::{
    DEFAULT_MAX_TASK_ATTEMPTS, JobEnv, JobError, JobEvent, JobOptions, JobReport, PlanReads, plan,
    table_output,
};
use crate::cleanup::{delete_scratch, sweep_job_files};
use crate::openlineage::{EventType, RunFacts, Written, run_event};
use crate::scheduler::{StageCount, StageTracker};
use nightshift_core::table::files::{delete_table_files, is_table_file};

/// How a job's phases ended.
#[derive(Debug)]
enum Ended {
    /// The job's snapshot is in the table: committed now, or found there (an earlier run of
    /// the job, or another coordinator).
    Committed(CommitOutcome),
    /// Every task succeeded and there was nothing to commit (an empty append).
    Empty,
    Failed(JobError),
}

/// Runs one job to the end: exactly one snapshot on success, nothing on failure.
pub async fn run_job(
    env: &JobEnv,
    spec: &ResolvedSpec,
    options: &JobOptions,
    on_event: &(dyn Fn(JobEvent) + Send + Sync),
) -> Result<JobReport, JobError> {
    let span = info_span!("job", job_id = %options.job_id, pipeline = %spec.spec.pipeline.name);
    async {
        // Each run holds the job under a token of its own, so not even this coordinator's
        // late sweeper (which sweeps as `env.owner`) can take a job while a run of it is on.
        let run_owner = format!("{}/run-{}", env.owner, uuid::Uuid::now_v7());
        let ownership = Ownership::acquire(
            env.state.clone(),
            &options.job_id,
            &run_owner,
            ownership_ttl(env.lease_ttl),
        )
        .await?;
        let mut run = JobRun::new(env, spec, options, &ownership);
        let ended = run.phases(on_event).await;
        let result = run.finish(ended, on_event).await;
        ownership.release().await;
        result
    }
    .instrument(span)
    .await
}

/// How long a coordinator's hold on a job lasts unless renewed: a restarted coordinator
/// waits at most this long for the job its predecessor held.
pub fn ownership_ttl(lease_ttl: Duration) -> Duration {
    (lease_ttl / 3).max(Duration::from_secs(2))
}

/// One run of a job: what the phases learn and the finish path needs.
struct JobRun<'a> {
    env: &'a JobEnv,
    spec: &'a ResolvedSpec,
    options: &'a JobOptions,
    ownership: &'a Ownership,
    started: Instant,
    /// Unix milliseconds at the start.
    started_at_ms: i64,
    report: JobReport,
    /// Each task attempt and each stage, for the report page.
    timeline: Vec<TaskSpan>,
    stage_summaries: Vec<StageSummary>,
    /// The catalog and target, once opened: what cleanup needs.
    catalog: Option<Arc<dyn Catalog>>,
    ident: Option<TableIdent>,
    /// The job created the target table (a failed first run drops it again).
    created_table: bool,
    /// The files this run's commit put in the snapshot.
    just_committed: TableReferences,
    /// What the planner read, for the snapshot's lineage.
    inputs: Vec<nightshift_core::sources::SourceSummary>,
    /// The result's schema, once planned (for the OpenLineage events).
    output_schema: Option<datafusion::arrow::datatypes::SchemaRef>,
    /// The rejects table, when a check quarantines rows.
    rejects: Option<RejectsTable>,
}

/// The table a job's quarantined rows go to (`<table>__rejects`), as the job set it up.
struct RejectsTable {
    ident: TableIdent,
    /// The job created it (a failed first run drops it again, if it stayed empty).
    created: bool,
    written_with: WrittenWith,
    change: Option<SchemaChange>,
    /// The rejects files the job's rejects snapshot holds, once committed.
    just_committed: TableReferences,
}

impl<'a> JobRun<'a> {
    fn new(
        env: &'a JobEnv,
        spec: &'a ResolvedSpec,
        options: &'a JobOptions,
        ownership: &'a Ownership,
    ) -> Self {
        JobRun {
            env,
            spec,
            options,
            ownership,
            started: Instant::now(),
            started_at_ms: now_ms(),
            timeline: Vec::new(),
            stage_summaries: Vec::new(),
            report: JobReport {
                job_id: options.job_id.to_string(),
                pipeline: spec.spec.pipeline.name.clone(),
                table: spec.spec.target.table.clone(),
                mode: spec.spec.target.mode.to_string(),
                snapshot_id: None,
                already_committed: false,
                rows: 0,
                files: 0,
                partitions: 0,
                max_files_per_partition: 0,
                bytes: 0,
                stages: 0,
                tasks: 0,
                duration_ms: 0,
                checks: Vec::new(),
                rejected_rows: 0,
                rejects_snapshot_id: None,
            },
            catalog: None,
            ident: None,
            created_table: false,
            just_committed: TableReferences::default(),
            inputs: Vec::new(),
            output_schema: None,
            rejects: None,
        }
    }

    /// Ends the job before any task runs when a check on a source fails with error severity
    /// (nothing was written; the report lists the source checks).
    fn fail_on_source_checks(
        &mut self,
        outcomes: &[nightshift_proto::v1::CheckOutcome],
    ) -> Result<(), JobError> {
        let on_sources: Vec<_> = self
            .spec
            .spec
            .check
            .iter()
            .filter(|c| !c.on_result())
            .cloned()
            .collect();
        let results = nightshift_core::checks::judge(&on_sources, outcomes, 0, None);
        if nightshift_core::checks::blocking(&results).is_empty() {
            return Ok(());
        }
        self.report.checks = results;
        Err(JobError::ChecksFailed(self.report.checks.clone()))
    }

    /// Emits the job's OpenLineage run event of `kind`, if a sink is configured.
    async fn emit_lineage(&self, kind: EventType, error: Option<&str>) {
        let Some(sink) = &self.env.lineage else {
            return;
        };
        let catalog = match &self.env.catalog {
            nightshift_core::table::CatalogConfig::Sql { name, .. }
            | nightshift_core::table::CatalogConfig::Rest { name, .. } => name.as_str(),
        };
        let ended = kind != EventType::Start;
        // The event leaves for another server: the SQL holds secret-named parameters'
        // values, as the report page's does, and they are masked as there.
        let sql = self.masked(&self.spec.sql);
        let error = error.map(|e| self.masked(e));
        let facts = RunFacts {
            namespace: sink.namespace(),
            job_id: self.job().as_str(),
            pipeline: &self.spec.spec.pipeline.name,
            sql: &sql,
            catalog,
            table: &self.spec.spec.target.table,
            inputs: &self.inputs,
            output_schema: self.output_schema.as_deref(),
            written: ended.then_some(Written {
                rows: self.report.rows,
                bytes: self.report.bytes,
                checks: &self.report.checks,
                check_specs: &self.spec.spec.check,
            }),
            error: error.as_deref(),
        };
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        sink.emit(&run_event(kind, &facts, &now)).await;
    }

    fn job(&self) -> &'a JobId {
        &self.options.job_id
    }

    async fn phases(&mut self, on_event: &(dyn Fn(JobEvent) + Send + Sync)) -> Ended {
        match self.plan_run_commit(on_event).await {
            Ok(ended) => ended,
            Err(e) => Ended::Failed(e),
        }
    }

    /// Plan → run stages → commit. Every `?` here comes before the commit or is the commit's
    /// own error (which has already checked whether the snapshot landed after all).
    async fn plan_run_commit(
        &mut self,
        on_event: &(dyn Fn(JobEvent) + Send + Sync),
    ) -> Result<Ended, JobError> {
        let ident = parse_table_ident(&self.spec.spec.target.table)?;
        let catalog = open_catalog(&self.env.catalog).await?;
        self.ident = Some(ident.clone());
        self.catalog = Some(catalog.clone());

        // The table's history is the record of what was committed: a job id found there is done.
        let existed = catalog
            .table_exists(&ident)
            .await
            .map_err(CoreError::from)?;
        if existed {
            let table = catalog.load_table(&ident).await.map_err(CoreError::from)?;
            if let Some(snapshot_id) = find_job_snapshot(&table, self.job()) {
                let summary = table
                    .metadata()
                    .snapshot_by_id(snapshot_id)
                    .map(|s| s.summary().additional_properties.clone())
                    .unwrap_or_default();
                if let Some(why) = crate::lineage::committed_by_another(self.spec, &summary) {
                    return Err(JobError::Invalid(CoreError::Target {
                        table: ident.to_string(),
                        message: format!(
                            "job id `{}` was committed to this table (snapshot {snapshot_id}) {why}; a job id names one run of one pipeline: give this run its own job id (run --job-id; for a backfill, a new --run-id)",
                            self.job()
                        ),
                    }));
                }
                if !nightshift_core::table::in_current_history(&table, snapshot_id) {
                    return Err(JobError::Invalid(CoreError::Target {
                        table: ident.to_string(),
                        message: format!(
                            "job id `{}` committed snapshot {snapshot_id}, which the table no longer includes (it was rolled back to an earlier snapshot), so its rows are not in the table; to commit them again, give this run its own job id (run --job-id; for a backfill, a new --run-id)",
                            self.job()
                        ),
                    }));
                }
                info!(snapshot_id, "job was committed before; nothing to do");
                self.report.counts_of_earlier_commit(&summary);
                return Ok(Ended::Committed(CommitOutcome {
                    snapshot_id,
                    already_committed: true,
                    committed_files: Default::default(),
                }));
            }
            // A backfill value committed before the pipeline was renamed: its job id named
            // the old name. Running it again would publish its rows twice.
            let pipeline = &self.spec.spec.pipeline;
            if let Some((old_id, snapshot_id)) =
                nightshift_core::table::backfill_values::under_previous_names(
                    self.job().as_str(),
                    &pipeline.name,
                    &pipeline.previous_names,
                )
                .into_iter()
                .find_map(|id| {
                    let snapshot = find_job_snapshot(&table, &JobId::parse(&id).ok()?)?;
                    Some((id, snapshot))
                })
            {
                info!(
                    snapshot_id,
                    old_id,
                    "job was committed before under the pipeline's previous name; nothing to do"
                );
                if let Some(earlier) = table.metadata().snapshot_by_id(snapshot_id) {
                    self.report
                        .counts_of_earlier_commit(&earlier.summary().additional_properties);
                }
                return Ok(Ended::Committed(CommitOutcome {
                    snapshot_id,
                    already_committed: true,
                    committed_files: Default::default(),
                }));
            }
            // Committed, and its snapshot expired since: done as well (its files stay
            // referenced by the snapshots after it, so the cleanup keeps them).
            use nightshift_core::table::expired_jobs::expired_job_snapshot;
            if let Some(snapshot_id) = expired_job_snapshot(&table, self.job().as_str()).await? {
                info!(
                    snapshot_id,
                    "job was committed before (its snapshot has expired); nothing to do"
                );
                return Ok(Ended::Committed(CommitOutcome {
                    snapshot_id,
                    already_committed: true,
                    committed_files: Default::default(),
                }));
            }
        }

        let planned = plan(
            self.spec,
            self.options,
            Some(catalog.as_ref()),
            (self.env.plan_mode, PlanReads::Data),
        )
        .await?;
        let job_plan = planned.plan;
        let merge = planned.merge;
        let compaction = planned.compaction;
        self.inputs = planned.sources;
        if nightshift_core::sources::nothing_new_upstream(&self.inputs) {
            info!("no incremental source has anything new since the last run; nothing to do");
            return Ok(Ended::Empty);
        }
        self.output_schema = Some(job_plan.output_schema.clone());
        self.emit_lineage(EventType::Start, None).await;
        self.report.stages = job_plan.stages.len();
        self.report.tasks = job_plan.total_tasks();
        info!(
            stages = self.report.stages,
            tasks = self.report.tasks,
            partitions = planned.partitions,
            "planned"
        );
        on_event(JobEvent::Planned {
            stages: job_plan
                .stages
                .iter()
                .map(|s| StageCount {
                    stage: s.id.0,
                    done: 0,
                    total: s.tasks,
                })
                .collect(),
            tasks: self.report.tasks,
        });

        let properties: HashMap<String, String> = self
            .spec
            .spec
            .target
            .properties
            .clone()
            .into_iter()
            .collect();
        let layout = TargetLayout {
            result_schema: &job_plan.output_schema,
            partition_by: &self.spec.partition_by,
            evolution: self.spec.spec.target.schema_evolution,
        };
        self.record_state(JobState::Running, "").await;
        self.env.queue.open_results(self.job()).await?;
        let max_attempts = self
            .options
            .max_task_attempts
            .or(self.spec.spec.execution.max_task_attempts)
            .unwrap_or(DEFAULT_MAX_TASK_ATTEMPTS);
        let mut checks_run = SetCheckRun {
            env: self.env,
            job: self.job(),
            ownership: self.ownership,
            started: self.started,
            max_attempts,
            partitions: planned.partitions,
            highest_stage: job_plan.stages.iter().map(|s| s.id.0).max().unwrap_or(0),
        };
        // Checks on sources run before any task of the job; a failed error check ends it
        // with nothing written.
        let on_sources = checks_run
            .run_on_sources(
                &planned.session,
                &self.spec.spec.check,
                catalog.as_ref(),
                &mut self.timeline,
            )
            .await?;
        self.stage_summaries.extend(on_sources.stages);
        let source_outcomes = on_sources.outcomes;
        self.fail_on_source_checks(&source_outcomes)?;

        let (table, schema_change) =
            ensure_target(catalog.as_ref(), &ident, &layout, &properties).await?;
        self.created_table = !existed;
        let written_with = WrittenWith::current(&table);
        if let Some(change) = &schema_change {
            info!(changes = %change.changes.join("; "), "the run evolves the table's schema (committed with its rows)");
        }

        let mut output = table_output(
            &table,
            schema_change.as_ref().map(|c| &c.schema),
            nightshift_core::checks::row_checks(&self.spec.spec.check, &job_plan.output_schema)?,
        )?;
        output.rejects = self
            .ensure_rejects(catalog.as_ref(), &job_plan.output_schema)
            .await?;
        if let Some(compaction) = &compaction {
            output.target_file_size_bytes = compaction.target_file_bytes;
            output.parquet_properties.insert(
                nightshift_core::table::provenance::ROWS_OF_JOBS_BY_PARTITION.to_string(),
                compaction.footers.clone(),
            );
        }
        let mut stages = StageRunner::new(
            self.env,
            self.job(),
            self.ownership,
            nightshift_proto::v1::task_definition::Output::Table(output),
            StageTracker::new(&job_plan, max_attempts, job_plan.fingerprint()?),
            self.started,
        );
        let ran = stages.run(on_event).await;
        self.stage_summaries
            .extend(stage_summaries(&stages.tracker, &stages.timeline));
        for span in stages.timeline.drain(..) {
            keep_span(&mut self.timeline, span);
        }
        ran?;

        let files = stages.tracker.committed_files();
        self.report.rows = stages.tracker.final_rows();
        let set_checks = checks_run
            .run_on_result(
                &self.spec.spec.check,
                &nightshift_core::table::data_file_paths(&files),
                &job_plan.output_schema,
                catalog.as_ref(),
                &mut self.timeline,
            )
            .await;
        let set_outcomes = match set_checks {
            Ok(ran) => {
                self.stage_summaries.extend(ran.stages);
                ran.outcomes
            }
            Err(e) => return Err(e),
        };
        self.report.checks = nightshift_core::checks::judge(
            &self.spec.spec.check,
            stages
                .tracker
                .final_check_outcomes()
                .iter()
                .chain(&set_outcomes)
                .chain(&source_outcomes),
            self.report.rows,
            nightshift_core::table::previous_run_rows(&table, &self.spec.spec.pipeline.names()),
        );
        // A compaction changes files, never rows: one that wrote other than what it read
        // commits nothing (its files are swept like any failed job's).
        if let Some(compaction) = &compaction
            && self.report.rows != compaction.rows
        {
            return Err(JobError::Internal(CoreError::Target {
                table: self.spec.spec.target.table.clone(),
                message: format!(
                    "compaction wrote {} rows where the files it rewrote hold {} by their manifests; nothing committed",
                    self.report.rows, compaction.rows
                ),
            }));
        }
        // A failed error check ends the job here, before any commit: the finish path then
        // deletes only this job's own files (names parsed as its, none referenced by any
        // snapshot, see `cleanup::sweep_job_files`), so committed data is never touched.
        if !nightshift_core::checks::blocking(&self.report.checks).is_empty() {
            return Err(JobError::ChecksFailed(self.report.checks.clone()));
        }
        if let Some(why) = nightshift_core::checks::quarantine_would_empty(
            self.spec.spec.target.mode,
            self.report.rows,
            stages.tracker.final_rejected_rows(),
        ) {
            return Err(JobError::Internal(CoreError::Target {
                table: self.spec.spec.target.table.clone(),
                message: why,
            }));
        }
        for warned in self.report.checks.iter().filter(|c| !c.passed) {
            match warned.quarantined {
                true => {
                    tracing::warn!(check = %warned.name, detail = %warned.detail, "check quarantined rows: publishing the others")
                }
                false => {
                    tracing::warn!(check = %warned.name, detail = %warned.detail, "check failed (warn): publishing anyway")
                }
            }
        }
        self.report.bytes = stages.tracker.final_bytes();
        self.report.files = files.len();
        let spread = nightshift_core::table::files_per_partition(&files);
        self.report.partitions = spread.partitions;
        self.report.max_files_per_partition = spread.max_files;
        on_event(JobEvent::Committing { files: files.len() });
        self.record_state(JobState::Committing, "").await;
        if !self.ownership.still_held().await {
            return Err(Ownership::lost_error());
        }
        fail::fail_point!("coordinator-before-commit", |_| {
            Err(JobError::Internal(CoreError::Transport(
                "failpoint coordinator-before-commit".into(),
            )))
        });
        self.report.rejected_rows = stages.tracker.final_rejected_rows();
        self.commit_rejects(catalog.as_ref(), &stages.tracker.committed_reject_files())
            .await?;
        fail::fail_point!("coordinator-between-commits", |_| {
            tracing::error!("failpoint coordinator-between-commits: aborting");
            std::process::abort()
        });
        let outcome = self
            .commit(
                catalog.as_ref(),
                &ident,
                (&files, &stages.tracker.set_aside_partitions()),
                (written_with, schema_change.as_ref()),
                &merge,
            )
            .await?;
        fail::fail_point!("coordinator-after-commit", |_| {
            tracing::error!("failpoint coordinator-after-commit: aborting");
            std::process::abort()
        });
        Ok(match outcome {
            Some(outcome) => Ended::Committed(outcome),
            None => Ended::Empty,
        })
    }

    /// Creates or evolves the rejects table when a check quarantines rows: what the writing
    /// tasks need to write into it.
    async fn ensure_rejects(
        &mut self,
        catalog: &dyn Catalog,
        result: &datafusion::arrow::datatypes::Schema,
    ) -> Result<Option<nightshift_proto::v1::RejectsOutput>, JobError> {
        if !self.spec.spec.check.iter().any(|c| c.quarantines()) {
            return Ok(None);
        }
        let ident = parse_table_ident(&nightshift_spec::rejects_table(
            &self.spec.spec.target.table,
        ))?;
        let existed = catalog
            .table_exists(&ident)
            .await
            .map_err(CoreError::from)?;
        let (table, change, output) =
            ensure_rejects_table(catalog, &ident, result, self.job().as_str()).await?;
        self.rejects = Some(RejectsTable {
            ident,
            created: !existed,
            written_with: WrittenWith::current(&table),
            change,
            just_committed: TableReferences::default(),
        });
        Ok(Some(output))
    }

    /// Commits the quarantined rows to the rejects table, before the target's commit: a job
    /// whose snapshot is in the target has its rejects in the rejects table (the rejects
    /// commit is exactly once by job id, as the target's is, so a rerun after a crash
    /// between the two commits only the target).
    async fn commit_rejects(
        &mut self,
        catalog: &dyn Catalog,
        files: &[String],
    ) -> Result<(), CoreError> {
        let job = self.options.job_id.clone();
        let Some(rejects) = &mut self.rejects else {
            return Ok(());
        };
        let table = catalog.load_table(&rejects.ident).await?;
        let earlier = find_job_snapshot(&table, &job).map(|snapshot| {
            let rows = table.metadata().snapshot_by_id(snapshot).map_or(0, |s| {
                nightshift_core::table::commit::summary_count(
                    &s.summary().additional_properties,
                    "added-records",
                )
            });
            (snapshot, rows)
        });
        if let Some(why) = nightshift_core::table::rejects::earlier_rejects_differ(
            job.as_str(),
            &rejects.ident.to_string(),
            earlier,
            self.report.rejected_rows,
        ) {
            return Err(CoreError::Target {
                table: self.spec.spec.target.table.clone(),
                message: why,
            });
        }
        let summary = HashMap::from([
            (
                nightshift_core::table::PIPELINE_PROPERTY.to_string(),
                self.spec.spec.pipeline.name.clone(),
            ),
            (
                REJECTS_OF_PROPERTY.to_string(),
                self.spec.spec.target.table.clone(),
            ),
        ]);
        let commit = JobCommit {
            job: &job,
            mode: nightshift_spec::WriteMode::Append,
            data_files_json: files,
            written_with: rejects.written_with,
            merge_base: None,
            merge_files: None,
            summary,
            schema_change: rejects.change.as_ref(),
            set_aside_partitions_json: &[],
        };
        let outcome =
            commit_job_snapshot(catalog, &self.env.catalog, &rejects.ident, commit).await?;
        if let Some(outcome) = outcome {
            info!(
                table = %rejects.ident,
                snapshot_id = outcome.snapshot_id,
                rows = self.report.rejected_rows,
                again = outcome.already_committed,
                "quarantined rows committed"
            );
            for path in &outcome.committed_files {
                rejects.just_committed.insert(path);
            }
            self.report.rejects_snapshot_id = Some(outcome.snapshot_id);
        }
        Ok(())
    }

    /// Commits the job's files (appended, or replacing the table's rows), or nothing for an
    /// empty result.
    async fn commit(
        &self,
        catalog: &dyn Catalog,
        ident: &TableIdent,
        (files, set_aside_partitions): (&[String], &[String]),
        (written_with, schema_change): (WrittenWith, Option<&SchemaChange>),
        merge: &super::MergeRead,
    ) -> Result<Option<CommitOutcome>, CoreError> {
        let mut summary =
            crate::lineage::snapshot_summary(self.spec, &self.inputs, &self.report.checks);
        if self.rejects.is_some() {
            summary.insert(
                REJECTED_ROWS_PROPERTY.to_string(),
                self.report.rejected_rows.to_string(),
            );
        }
        let commit = JobCommit {
            job: self.job(),
            mode: self.spec.spec.target.mode,
            data_files_json: files,
            written_with,
            merge_base: merge.base,
            merge_files: merge.files.as_ref(),
            summary,
            schema_change,
            set_aside_partitions_json: set_aside_partitions,
        };
        let started = Instant::now();
        let outcome = commit_job_snapshot(catalog, &self.env.catalog, ident, commit).await;
        nightshift_core::metrics::commit_finished(
            self.spec.spec.target.mode.to_string().as_str(),
            match &outcome {
                Ok(Some(o)) if o.already_committed => "already_committed",
                Ok(Some(_)) => "committed",
                Ok(None) => "empty",
                Err(_) => "failed",
            },
            started.elapsed(),
            0, // conflicts are counted as each attempt loses
        );
        let outcome = outcome?;
        match &outcome {
            Some(o) => info!(
                snapshot_id = o.snapshot_id,
                again = o.already_committed,
                mode = %self.spec.spec.target.mode,
                "committed"
            ),
            None => info!("the result is empty; nothing to commit"),
        }
        Ok(outcome)
    }

    /// The one way a job ends: record the outcome, then clean up, whatever happened. Cleanup
    /// failures are logged, never returned: they cannot undo a commit, and the late sweep
    /// scheduled here tries again.
    async fn finish(
        mut self,
        ended: Ended,
        on_event: &(dyn Fn(JobEvent) + Send + Sync),
    ) -> Result<JobReport, JobError> {
        self.report.duration_ms = self.started.elapsed().as_millis() as u64;
        let (state, result) = match ended {
            Ended::Committed(outcome) => {
                for path in &outcome.committed_files {
                    self.just_committed.insert(path);
                }
                self.report.snapshot_id = Some(outcome.snapshot_id);
                self.report.already_committed = outcome.already_committed;
                (JobState::Succeeded, Ok(()))
            }
            Ended::Empty => (JobState::Succeeded, Ok(())),
            Ended::Failed(JobError::Cancelled) => (JobState::Cancelled, Err(JobError::Cancelled)),
            Ended::Failed(e) => (JobState::Failed, Err(e)),
        };
        if !self.ownership.still_held().await {
            warn!("another coordinator took over this job; it records the outcome and cleans up");
            return result.map(|()| self.report);
        }
        let detail = result
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default();
        // First, so workers stop reporting and discard what they still write.
        self.record_state(state, &detail).await;
        let lineage = match state {
            JobState::Succeeded => EventType::Complete,
            JobState::Cancelled => EventType::Abort,
            _ => EventType::Fail,
        };
        self.emit_lineage(lineage, result.as_ref().err().map(|_| detail.as_str()))
            .await;
        self.clean_up(state).await;
        on_event(JobEvent::Finished(Box::new(self.record(state, &detail))));
        match result {
            Ok(()) => {
                info!(snapshot_id = ?self.report.snapshot_id, rows = self.report.rows, files = self.report.files, "job succeeded");
                Ok(self.report)
            }
            Err(e) => {
                info!(error = %e, "job ended without a commit");
                Err(e)
            }
        }
    }

    /// `text` (the SQL, a plan, an error) redacted, with the values of secret-named
    /// parameters masked.
    fn masked(&self, text: &str) -> String {
        use nightshift_core::redact::{is_secret_name, mask_values, redact};
        let secrets: Vec<&str> = (self.spec.params.iter())
            .filter(|(name, _)| is_secret_name(name))
            .map(|(_, value)| value.as_str())
            .collect();
        mask_values(&redact(text), &secrets).into_owned()
    }

    /// The run as the report page draws it. The values of secret-named parameters, which the
    /// SQL and so the plan and errors may hold, are masked.
    fn record(&mut self, state: JobState, error: &str) -> RunRecord {
        let mut stages = std::mem::take(&mut self.stage_summaries);
        let timeline = std::mem::take(&mut self.timeline);
        let mask = |text: &str| self.masked(text);
        stages.sort_by_key(|s| s.stage);
        for stage in &mut stages {
            for operator in &mut stage.operators {
                *operator = mask(operator);
            }
        }
        RunRecord {
            status: state.as_str().to_string(),
            error: (!error.is_empty()).then(|| mask(error)),
            started_at_ms: self.started_at_ms,
            report: self.report.clone(),
            stages,
            timeline,
            lineage: crate::lineage::snapshot_summary(self.spec, &self.inputs, &self.report.checks)
                .into_iter()
                .collect(),
            sql: mask(&self.spec.sql),
        }
    }

    /// Removes the job's unreferenced data files and scratch, drops a table it created and
    /// left empty, forgets its task state, and schedules the late sweep.
    async fn clean_up(&self, state: JobState) {
        let job = self.job();
        // Forget the winners before sweeping: a later run of this job id must never adopt a
        // winner whose files the sweep deletes. If that fails, the files wait for the late
        // sweep.
        let forgotten = self.env.state.clear_task_outputs(job).await;
        if let Err(e) = &forgotten {
            warn!(error = %e, "cannot forget the job's task outputs; its files wait for the late sweep");
        }
        if let (Ok(()), Some(catalog), Some(ident)) = (&forgotten, &self.catalog, &self.ident) {
            let failed = state != JobState::Succeeded;
            let catalog = catalog.as_ref();
            clean_table(
                catalog,
                ident,
                job,
                &self.just_committed,
                failed && self.created_table,
            )
            .await;
            if let Some(rejects) = &self.rejects {
                let drop = failed && rejects.created;
                clean_table(catalog, &rejects.ident, job, &rejects.just_committed, drop).await;
            }
        }
        delete_scratch(&self.env.scratch, job).await;
        if let Err(e) = self.env.queue.close_results(job).await {
            warn!(error = %e, "cannot delete the job's result queue");
        }
        self.schedule_late_sweep().await;
    }

    async fn schedule_late_sweep(&self) {
        let job = self.job();
        let due = now_ms() + self.env.late_sweep_after.as_millis() as i64;
        if let Err(e) = self
            .env
            .state
            .schedule_sweep(job, &self.spec.spec.target.table, due)
            .await
        {
            warn!(error = %e, "cannot schedule the job's late sweep");
        }
    }

    /// Records the job's state; a state store that is briefly unreachable does not stop the
    /// job (workers and the API read the state as a hint).
    async fn record_state(&self, state: JobState, detail: &str) {
        if let Err(e) = self
            .env
            .state
            .set_job_state(self.job(), state, detail)
            .await
        {
            warn!(%state, error = %e, "cannot record the job state");
        }
    }
}

/// Sweeps the job's unreferenced files from `ident` (`sweep_job_files`: parsed as this job's,
/// referenced by no snapshot) and, with `drop_created`, drops the table if it stayed empty.
async fn clean_table(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    job: &JobId,
    just_committed: &TableReferences,
    drop_created: bool,
) {
    if let Err(e) = sweep_job_files(catalog, ident, job, just_committed).await {
        warn!(table = %ident, error = %e, "cannot sweep the job's data files; the late sweep retries");
    }
    if drop_created {
        drop_if_empty(catalog, ident, job).await;
    }
}

/// A table the job created and never committed to is dropped, so a failed first run leaves
/// the catalog as it found it — unless another job has written into it meanwhile (its first
/// run may be on its way to a commit).
async fn drop_if_empty(catalog: &dyn Catalog, ident: &TableIdent, job: &JobId) {
    let Ok(table) = catalog.load_table(ident).await else {
        return;
    };
    if table.metadata().snapshots().len() > 0 {
        return;
    }
    let Ok(root) = Location::parse(table.metadata().location(), std::path::Path::new("/")) else {
        return;
    };
    if let Ok(files) = nightshift_core::storage::list_objects(&root.join("data")).await
        && files.iter().any(|(file, _)| {
            is_table_file(root.url().path(), file.url().path())
                && nightshift_core::names::parse_data_file_name(file.url().path())
                    .is_some_and(|name| name.attempt.job != *job)
        })
    {
        info!(table = %ident, "another job writes into the table this job created; it stays");
        return;
    }
    if let Err(e) = catalog.drop_table(ident).await {
        warn!(table = %ident, error = %e, "cannot drop the table created by the failed job");
    } else if let Err(e) = delete_table_files(&root).await {
        // No snapshot, so nothing of the table's is referenced. Only the table's own files
        // go: another table can live inside its directory (`a.b.c` in `a.b`'s).
        warn!(table = %ident, error = %e, "cannot delete the files of the dropped table");
    }
}

/// The rejects table's snapshot summary property naming the table whose job set the rows aside.
pub const REJECTS_OF_PROPERTY: &str = "nightshift.rejects-of";

/// The target's snapshot summary property counting the rows the job set aside.
pub const REJECTED_ROWS_PROPERTY: &str = "nightshift.rejected-rows";

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
