//! From SQL to Ballista query stages.
//!
//! DataFusion plans the SQL; Ballista's `DefaultDistributedPlanner` cuts the physical plan
//! into stages at hash repartitions, coalesces and sort-preserving merges (and turns small
//! hash joins into broadcast stages). Each stage is split into one task per input partition.

use std::sync::Arc;

use ballista_core::execution_plans::ShuffleWriter;
use ballista_scheduler::planner::{DefaultDistributedPlanner, DistributedPlanner};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::context::SQLOptions;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::{ExecutionPlan, displayable};
use datafusion::prelude::SessionContext;

use crate::error::{CoreError, Result};
use crate::ids::{JobId, StageId};
use crate::shuffle::upstream_stages;

/// One stage of a job.
#[derive(Debug, Clone)]
pub struct PlannedStage {
    pub id: StageId,
    /// The stage plan: a Ballista shuffle writer whose leaves may be unresolved shuffles.
    pub plan: Arc<dyn ShuffleWriter>,
    /// Number of tasks (input partitions).
    pub tasks: usize,
    /// Number of shuffle output partitions.
    pub output_partitions: usize,
    /// Stages whose output this one reads.
    pub upstream: Vec<StageId>,
    /// The last stage writes the target table instead of shuffle output.
    pub is_final: bool,
}

/// A planned job: its stages in dependency order, the last one final.
#[derive(Debug, Clone)]
pub struct JobPlan {
    pub stages: Vec<PlannedStage>,
    pub output_schema: SchemaRef,
}

impl JobPlan {
    pub fn total_tasks(&self) -> usize {
        self.stages.iter().map(|s| s.tasks).sum()
    }

    /// A readable listing of the stages, for `validate` and logs.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for stage in &self.stages {
            let plan: Arc<dyn ExecutionPlan> = stage.plan.clone();
            out.push_str(&format!(
                "stage {} ({} task{}{}{})\n{}",
                stage.id,
                stage.tasks,
                if stage.tasks == 1 { "" } else { "s" },
                if stage.upstream.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", reads stage {}",
                        stage
                            .upstream
                            .iter()
                            .map(|s| s.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                if stage.is_final {
                    ", writes the table"
                } else {
                    ""
                },
                displayable(plan.children()[0].as_ref()).indent(false)
            ));
        }
        out
    }
}

/// Plans `sql` against the tables registered in `ctx`. Only queries are accepted.
pub async fn plan_job(ctx: &SessionContext, job: &JobId, sql: &str) -> Result<JobPlan> {
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx
        .sql_with_options(sql, options)
        .await
        .map_err(|e| CoreError::Sql(crate::task::clean_message(&e.to_string())))?;
    let output_schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let physical = df
        .create_physical_plan()
        .await
        .map_err(|e| CoreError::Sql(crate::task::clean_message(&e.to_string())))?;
    let physical = strip_final_coalesce(physical);
    let mut planner = DefaultDistributedPlanner::new();
    let writers =
        planner.plan_query_stages(job.as_str(), physical, ctx.state().config().options())?;
    let last = writers.len().saturating_sub(1);
    let stages = writers
        .into_iter()
        .enumerate()
        .map(|(i, writer)| {
            let as_plan: Arc<dyn ExecutionPlan> = writer.clone();
            let tasks = writer.input_partition_count();
            let output_partitions = writer
                .shuffle_output_partitioning()
                .map_or(tasks, |p| p.partition_count());
            Ok(PlannedStage {
                id: StageId(writer.stage_id() as u32),
                upstream: upstream_stages(&as_plan)?
                    .into_iter()
                    .map(StageId)
                    .collect(),
                plan: writer,
                tasks,
                output_partitions,
                is_final: i == last,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(JobPlan {
        stages,
        output_schema,
    })
}

/// The table is written by every partition of the last stage in parallel, so a top-level
/// merge into one partition only costs parallelism. An ORDER BY keeps its merge.
fn strip_final_coalesce(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    if plan.as_any().is::<CoalescePartitionsExec>() {
        plan.children()[0].clone()
    } else {
        plan
    }
}
