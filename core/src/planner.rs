//! From SQL to Ballista query stages.
//!
//! DataFusion plans the SQL (with Nightshift's join strategy, `joins`); Ballista's
//! `DefaultDistributedPlanner` cuts the physical plan into stages at hash repartitions,
//! coalesces and sort-preserving merges, and writes the build side of each broadcast join as
//! a stage every probe task reads whole. Each stage is split into one task per input
//! partition.
//!
//! A job whose tasks all run in this process ([`PlanMode::SingleProcess`], the embedded mode)
//! is not cut: its one stage is the whole plan, shared by its tasks ([`SharedPlanExec`]), so
//! exchanges stay in memory and each broadcast is built once.
//!
//! The result of a job writing a partitioned table is hash-distributed by the partition
//! values first (Iceberg's `write.distribution-mode = hash`): each table partition is written
//! by one task, into files of the target size, not one small file per task. Each task then
//! sorts its rows by the partition source columns (a spilling sort), so its writer holds one
//! partition's file open at a time instead of one per partition it was given.

use std::sync::Arc;

use ballista_core::execution_plans::{ShuffleWriter, ShuffleWriterExec, UnresolvedShuffleExec};
use ballista_core::extension::SessionConfigExt;
use ballista_scheduler::planner::{DefaultDistributedPlanner, DistributedPlanner};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::physical_expr::expressions::{CastExpr, Column, Literal};
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_expr::{PhysicalExpr, ScalarFunctionExpr};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning, displayable};
use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;
use nightshift_spec::{PartitionField, PartitionTransform};

use crate::broadcast_scans::{read_small_broadcasts_in_place, rebuild_writer};
use crate::error::{CoreError, Result};
use crate::ids::{JobId, StageId};
use crate::joins::single_probe_for_build_emitting_joins;
use crate::session::{BROADCAST_THRESHOLD_KEY, with_broadcast_threshold};
use crate::shared_plan::SharedPlanExec;
use crate::shuffle::upstream_stages;
use crate::sql_depth::check_expression_depth;

/// Where a job's tasks run, which decides how its plan is cut. `task_memory` is what one
/// task may hold (the workers' memory limit over their concurrent tasks); `None` assumes
/// workers like the planning machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanMode {
    /// Tasks run on any worker: stages cut at every exchange, which goes through shuffle
    /// objects.
    Distributed { task_memory: Option<u64> },
    /// Every task runs in the planning process, all at once (the embedded mode): one stage
    /// of `tasks` partitions on one shared plan instance; exchanges stay in memory.
    SingleProcess {
        tasks: usize,
        task_memory: Option<u64>,
    },
}

impl PlanMode {
    /// What one broadcast join's table may count on, if known: a task's memory on workers
    /// (each builds the table once per stage, beside tasks of other stages), all the tasks'
    /// in one process, where they probe one table.
    pub fn broadcast_memory(&self) -> Option<u64> {
        match *self {
            PlanMode::Distributed { task_memory } => task_memory,
            PlanMode::SingleProcess { tasks, task_memory } => {
                task_memory.map(|bytes| bytes * tasks.max(1) as u64)
            }
        }
    }
}

impl Default for PlanMode {
    fn default() -> Self {
        PlanMode::Distributed { task_memory: None }
    }
}

/// What the planner needs besides the SQL.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    pub mode: PlanMode,
    /// The target table's partition fields: rows are distributed by them before the write.
    pub partition_by: Vec<PartitionField>,
}

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
    /// What identifies this plan across runs of its job: a digest of every stage's id, task
    /// and output counts, and encoded plan (the files each scan task reads included). A
    /// restarted coordinator plans the job again and reuses the task outputs an earlier run
    /// recorded only when this is the same; tasks carry it and their results echo it, so no
    /// output of another plan (its sources changed meanwhile) is mixed into the job's.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        for stage in &self.stages {
            for n in [
                stage.id.0,
                stage.tasks as u32,
                stage.output_partitions as u32,
            ] {
                digest.update(n.to_le_bytes());
            }
            digest.update([u8::from(stage.is_final)]);
            let plan: Arc<dyn ExecutionPlan> = stage.plan.clone();
            let encoded = crate::codec::encode_plan(plan)?;
            digest.update((encoded.len() as u64).to_le_bytes());
            digest.update(&encoded);
        }
        Ok(digest.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

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
pub async fn plan_job(
    ctx: &SessionContext,
    job: &JobId,
    sql: &str,
    options: &PlanOptions,
) -> Result<JobPlan> {
    configure_planning(ctx, options.mode)?;
    let df = match spec_query(ctx, sql).await {
        Ok(df) => df,
        Err(e) => return Err(sql_error(ctx, e).await),
    };
    let output_schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let physical = match df.create_physical_plan().await {
        Ok(physical) => physical,
        Err(e) => return Err(sql_error(ctx, e).await),
    };
    let physical = strip_final_coalesce(physical);
    let physical = distribute_by_partition(ctx, physical, &options.partition_by)?;
    let physical = cluster_by_partition(ctx, physical, &options.partition_by)?;
    match options.mode {
        PlanMode::Distributed { .. } => {
            let physical = single_probe_for_build_emitting_joins(physical)?;
            plan_stages(ctx, job, physical, output_schema)
        }
        PlanMode::SingleProcess { .. } => Ok(single_stage(job, physical, output_schema)?),
    }
}

/// What SQL from a spec may be (the transform, a check, a merge's key bounds): a query,
/// nothing that defines or changes tables, files or settings. DataFusion runs DDL such as
/// `CREATE EXTERNAL TABLE` while planning and `COPY ... TO` when executed, so every
/// statement from a spec is planned with these options.
pub fn queries_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Plans SQL from a spec: a query ([`queries_only`]) whose expressions are not too deep
/// for the planner ([`check_expression_depth`]).
pub async fn spec_query(
    ctx: &SessionContext,
    sql: &str,
) -> datafusion::error::Result<datafusion::dataframe::DataFrame> {
    check_expression_depth(sql).map_err(|e| match e {
        CoreError::Sql(message) => DataFusionError::Plan(message),
        other => DataFusionError::Plan(other.to_string()),
    })?;
    ctx.sql_with_options(sql, queries_only()).await
}

/// The columns `sql` gives against the tables registered in `ctx`, from its logical plan
/// (names and types resolved, nothing optimized or planned to run). Only queries are
/// accepted, as by [`plan_job`].
pub async fn output_schema(ctx: &SessionContext, sql: &str) -> Result<SchemaRef> {
    check_expression_depth(sql)?;
    let state = ctx.state();
    let plan = match state.create_logical_plan(sql).await {
        Ok(plan) => plan,
        Err(e) => return Err(sql_error(ctx, e).await),
    };
    queries_only()
        .verify_plan(&plan)
        .map_err(|e| CoreError::Sql(crate::task::clean_message(&e.to_string())))?;
    Ok(Arc::new(plan.schema().as_arrow().clone()))
}

/// `e`, an error planning a spec's SQL against `ctx`, as the user reads it: DataFusion's
/// words, and where it names a column that no table has because an unquoted name is
/// lowercased (`OrderID` read as `orderid`), the column it surely meant, quoted.
async fn sql_error(ctx: &SessionContext, e: DataFusionError) -> CoreError {
    let message = crate::task::clean_message(&e.to_string());
    let Some(missing) = missing_field(&message) else {
        return CoreError::Sql(message);
    };
    let columns = registered_columns(ctx).await;
    match case_hint(missing, &columns) {
        Some(hint) => CoreError::Sql(format!("{message} {hint}")),
        None => CoreError::Sql(message),
    }
}

/// The column DataFusion's "No field named x" names (as it resolved it: lowercased
/// unless quoted).
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.split("No field named ").nth(1)?;
    let token = rest.split(' ').next()?.trim_end_matches('.');
    // A qualified name (`orders.orderid`) names the column last.
    let name = token.rsplit('.').next()?;
    (!name.is_empty()).then_some(name)
}

/// Advice for `missing`, if some tables' columns (`(table, column)`) spell it in other case.
fn case_hint(missing: &str, columns: &[(String, String)]) -> Option<String> {
    let (table, column) = columns
        .iter()
        .find(|(_, c)| c != missing && c.to_lowercase() == missing.to_lowercase())?;
    Some(format!(
        "Column names are case-sensitive and an unquoted name is read in lower case: write \"{column}\" (a column of `{table}`) in double quotes."
    ))
}

/// Every column of the tables a spec's SQL can name in `ctx` (its sources, not the raw
/// tables behind them), as `(table, column)`.
async fn registered_columns(ctx: &SessionContext) -> Vec<(String, String)> {
    let state = ctx.state();
    let options = state.config_options();
    let Some(schema) = ctx
        .catalog(&options.catalog.default_catalog)
        .and_then(|c| c.schema(&options.catalog.default_schema))
    else {
        return Vec::new();
    };
    let mut columns = Vec::new();
    for table in schema.table_names() {
        if table.starts_with("__") {
            continue;
        }
        if let Ok(Some(provider)) = schema.table(&table).await {
            for field in provider.schema().fields() {
                columns.push((table.clone(), field.name().clone()));
            }
        }
    }
    columns
}

/// Moves the broadcast threshold (a spec's `broadcast_join_threshold_bytes`, stored under
/// Ballista's key) to DataFusion's join selection and turns Ballista's own broadcast
/// promotion off: it also broadcasts joins whose unmatched build rows would repeat per task
/// (see `joins`). The single-process mode plans for its own task count.
fn configure_planning(ctx: &SessionContext, mode: PlanMode) -> Result<()> {
    let state = ctx.state_ref();
    let mut state = state.write();
    let config = state.config_mut();
    let threshold = config.ballista_config().broadcast_join_threshold_bytes() as u64;
    let mut updated = with_broadcast_threshold(config.clone(), threshold);
    let options = updated.options_mut();
    options.set(BROADCAST_THRESHOLD_KEY, "0")?;
    let task_memory = match mode {
        PlanMode::Distributed { task_memory } => task_memory,
        PlanMode::SingleProcess { tasks, task_memory } => {
            options.set("nightshift.single_process", "true")?;
            options.execution.target_partitions = tasks.max(1);
            task_memory
        }
    };
    if let Some(bytes) = task_memory {
        options.set("nightshift.task_memory_bytes", &bytes.to_string())?;
    }
    *config = updated;
    Ok(())
}

/// The physical plan as Ballista stages, in dependency order.
fn plan_stages(
    ctx: &SessionContext,
    job: &JobId,
    physical: Arc<dyn ExecutionPlan>,
    output_schema: SchemaRef,
) -> Result<JobPlan> {
    let mut planner = DefaultDistributedPlanner::new();
    let options = ctx.state().config().options().clone();
    let writers = planner.plan_query_stages(job.as_str(), physical, &options)?;
    let threshold = options.optimizer.hash_join_single_partition_threshold;
    let writers = read_small_broadcasts_in_place(writers, threshold)?;
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

/// `plan` with every stage id moved up by `offset` (the stage writers, the shuffle
/// placeholders reading them, and each stage's upstream list), so the stages of a second
/// query of the same job (a `[[check]]` over its written rows) get ids, shuffle directories
/// and task records of their own beside the job's.
pub fn renumber_stages(plan: JobPlan, offset: u32) -> Result<JobPlan> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    let stages = plan
        .stages
        .into_iter()
        .map(|stage| {
            let writer: Arc<dyn ExecutionPlan> = stage.plan.clone();
            let child = writer.children()[0].clone().transform_up(|node| {
                Ok(
                    match node.as_any().downcast_ref::<UnresolvedShuffleExec>() {
                        Some(unresolved) => {
                            let mut moved = unresolved.clone();
                            moved.stage_id += offset as usize;
                            Transformed::yes(Arc::new(moved) as Arc<dyn ExecutionPlan>)
                        }
                        None => Transformed::no(node),
                    },
                )
            })?;
            let id = stage.plan.stage_id() + offset as usize;
            Ok(PlannedStage {
                id: StageId(stage.id.0 + offset),
                plan: rebuild_writer(&stage.plan, id, child.data)?,
                upstream: stage
                    .upstream
                    .iter()
                    .map(|s| StageId(s.0 + offset))
                    .collect(),
                ..stage
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(JobPlan {
        stages,
        output_schema: plan.output_schema,
    })
}

/// The whole plan as one final stage whose tasks share one instance of it.
fn single_stage(
    job: &JobId,
    physical: Arc<dyn ExecutionPlan>,
    output_schema: SchemaRef,
) -> Result<JobPlan> {
    let tasks = physical
        .properties()
        .output_partitioning()
        .partition_count();
    let shared: Arc<dyn ExecutionPlan> = SharedPlanExec::register(physical);
    let writer = ShuffleWriterExec::try_new(job.to_string(), 1, shared, String::new(), None)?;
    Ok(JobPlan {
        stages: vec![PlannedStage {
            id: StageId(1),
            plan: Arc::new(writer),
            tasks,
            output_partitions: tasks,
            upstream: vec![],
            is_final: true,
        }],
        output_schema,
    })
}

/// Hash-distributes the result by the target's partition values, so all rows of a table
/// partition reach one task. Time transforms hash the truncated value (every day of a month
/// goes to the month's task); bucket and truncate hash the source column, which keeps equal
/// values together but may split a bucket over tasks.
fn distribute_by_partition(
    ctx: &SessionContext,
    plan: Arc<dyn ExecutionPlan>,
    partition_by: &[PartitionField],
) -> Result<Arc<dyn ExecutionPlan>> {
    let partitions = plan.properties().output_partitioning().partition_count();
    if partition_by.is_empty() || partitions <= 1 {
        return Ok(plan);
    }
    let Some(exprs) = partition_key_exprs(ctx, &plan.schema(), partition_by)? else {
        // The target layout reports a missing partition column with a better message.
        return Ok(plan);
    };
    Ok(Arc::new(RepartitionExec::try_new(
        plan,
        Partitioning::Hash(exprs, partitions),
    )?))
}

/// For each field of `partition_by`, an expression of the result's columns with the same
/// value for rows of one partition: the truncated time for a time transform (the date
/// itself for the day of a date), the source column otherwise. `None` when a source column
/// is not in the result.
fn partition_key_exprs(
    ctx: &SessionContext,
    schema: &SchemaRef,
    partition_by: &[PartitionField],
) -> Result<Option<Vec<Arc<dyn PhysicalExpr>>>> {
    let config = Arc::new(ctx.state().config_options().as_ref().clone());
    let mut exprs: Vec<Arc<dyn PhysicalExpr>> = Vec::new();
    for field in partition_by {
        let Ok(index) = schema.index_of(&field.column) else {
            return Ok(None);
        };
        let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new(&field.column, index));
        let unit = match field.transform {
            PartitionTransform::Year => "year",
            PartitionTransform::Month => "month",
            PartitionTransform::Day => "day",
            PartitionTransform::Hour => "hour",
            _ => {
                exprs.push(column);
                continue;
            }
        };
        let expr: Arc<dyn PhysicalExpr> = match schema.field(index).data_type() {
            DataType::Date32 if unit == "day" => column,
            DataType::Date32 | DataType::Date64 => {
                let as_timestamp = Arc::new(CastExpr::new(
                    column,
                    DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Second, None),
                    None,
                ));
                truncate(unit, as_timestamp, schema, config.clone())?
            }
            // Iceberg cuts a `timestamptz` at UTC midnight; `date_trunc` of a value in
            // another zone would cut at that zone's, and one table partition would span two
            // runs of the sort (and two tasks of the distribution).
            DataType::Timestamp(time_unit, Some(_)) => {
                let in_utc = Arc::new(CastExpr::new(
                    column,
                    DataType::Timestamp(*time_unit, Some("+00:00".into())),
                    None,
                ));
                truncate(unit, in_utc, schema, config.clone())?
            }
            _ => truncate(unit, column, schema, config.clone())?,
        };
        exprs.push(expr);
    }
    Ok(Some(exprs))
}

/// How many leading fields of `partition_by` a partitioned write sorts by, so that its rows
/// arrive partition after partition. Sorting by an identity or time field's value keeps each
/// of its partitions in one run, and the next field then sorts within it. A truncate is
/// sorted by its source column: that keeps its own partitions in one run, but not those of a
/// field after it, so it is the last. A bucket scatters its source's order: the sort stops
/// before it.
pub fn clustering_fields(partition_by: &[PartitionField]) -> usize {
    let mut fields = 0;
    for field in partition_by {
        match field.transform {
            PartitionTransform::Bucket(_) => break,
            PartitionTransform::Truncate(_) => return fields + 1,
            _ => fields += 1,
        }
    }
    fields
}

/// Sorts each partition of `plan` by the partition keys of its [`clustering_fields`], so a
/// task's writer can close a table partition's file when the rows move past it (see
/// `table::open_files`). The sort spills under the task's memory limit; without it a task
/// holds a file open for every table partition it writes until its last row.
fn cluster_by_partition(
    ctx: &SessionContext,
    plan: Arc<dyn ExecutionPlan>,
    partition_by: &[PartitionField],
) -> Result<Arc<dyn ExecutionPlan>> {
    let sorted = &partition_by[..clustering_fields(partition_by)];
    let Some(exprs) = partition_key_exprs(ctx, &plan.schema(), sorted)? else {
        return Ok(plan);
    };
    let Some(ordering) = LexOrdering::new(exprs.into_iter().map(PhysicalSortExpr::new_default))
    else {
        return Ok(plan);
    };
    Ok(Arc::new(
        SortExec::new(ordering, plan).with_preserve_partitioning(true),
    ))
}

/// `date_trunc(unit, expr)`.
fn truncate(
    unit: &str,
    expr: Arc<dyn PhysicalExpr>,
    schema: &datafusion::arrow::datatypes::Schema,
    config: Arc<datafusion::config::ConfigOptions>,
) -> Result<Arc<dyn PhysicalExpr>> {
    let unit: Arc<dyn PhysicalExpr> =
        Arc::new(Literal::new(ScalarValue::Utf8(Some(unit.to_string()))));
    Ok(Arc::new(ScalarFunctionExpr::try_new(
        datafusion::functions::datetime::date_trunc(),
        vec![unit, expr],
        schema,
        config,
    )?))
}

/// The table is written by every partition of the last stage in parallel, so a top-level
/// merge into one partition only costs parallelism. An ORDER BY keeps its merge, and so does
/// a merge that carries a `LIMIT` (DataFusion folds a bare `LIMIT n` into the merge's
/// `fetch`): without it every partition kept its own `n` rows, and `LIMIT 10` over four
/// scan tasks published 40.
fn strip_final_coalesce(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    if plan.as_any().is::<CoalescePartitionsExec>() && plan.fetch().is_none() {
        plan.children()[0].clone()
    } else {
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_named_in_other_case_is_pointed_at_quoted() {
        let message = "No field named orderid. Did you mean 'orders.a.b'?.";
        assert_eq!(missing_field(message), Some("orderid"));
        assert_eq!(missing_field("Schema error: No field named x"), Some("x"));
        assert_eq!(
            missing_field("No field named orders.orderid. Valid fields are x."),
            Some("orderid")
        );
        assert_eq!(missing_field("table 'x' not found"), None);
        let columns: Vec<(String, String)> = [("orders", "OrderID"), ("orders", "a.b")]
            .iter()
            .map(|(t, c)| (t.to_string(), c.to_string()))
            .collect();
        let hint = case_hint("orderid", &columns).unwrap();
        assert!(
            hint.contains("write \"OrderID\" (a column of `orders`)"),
            "{hint}"
        );
        // A name no column spells in any case, or spells exactly, gets no hint.
        assert_eq!(case_hint("amount", &columns), None);
        assert_eq!(case_hint("OrderID", &columns), None);
    }
    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::datasource::MemTable;

    fn field(column: &str, transform: PartitionTransform) -> PartitionField {
        PartitionField {
            column: column.to_string(),
            transform,
        }
    }

    #[test]
    fn a_write_sorts_by_the_fields_before_a_bucket_and_up_to_a_truncate() {
        use PartitionTransform::*;
        let by = [
            field("ts", Day),
            field("region", Identity),
            field("ts", Hour),
            field("name", Truncate(3)),
            field("kind", Identity),
            field("id", Bucket(16)),
        ];
        assert_eq!(clustering_fields(&by), 4);
        assert_eq!(clustering_fields(&by[..3]), 3);
        assert_eq!(
            clustering_fields(&[field("id", Bucket(8)), field("ts", Day)]),
            0
        );
        assert_eq!(
            clustering_fields(&[field("ts", Month), field("id", Bucket(8))]),
            1
        );
        assert_eq!(clustering_fields(&[]), 0);
    }

    #[test]
    fn a_zoned_time_partition_is_keyed_by_its_utc_day_as_iceberg_cuts_it() {
        use datafusion::arrow::array::{Array, TimestampMicrosecondArray};
        use datafusion::arrow::datatypes::TimeUnit;
        let ctx = crate::session::new_session(crate::session::SessionOptions::default());
        let zoned = DataType::Timestamp(TimeUnit::Microsecond, Some("+02:00".into()));
        let schema = Arc::new(Schema::new(vec![Field::new("ts", zoned, true)]));
        let hour = 3_600_000_000_i64;
        let jan_1_utc = 19_723 * 24 * hour;
        // 21:30 and 23:30 on 1 January in UTC (23:30 on the 1st and 01:30 on the 2nd in
        // the column's zone), then 00:30 on the 2nd in UTC.
        let values = [21, 23, 24].map(|h| Some(jan_1_utc + h * hour + hour / 2));
        let column = TimestampMicrosecondArray::from(values.to_vec()).with_timezone("+02:00");
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(column)]).unwrap();
        let exprs = partition_key_exprs(&ctx, &schema, &[field("ts", PartitionTransform::Day)])
            .unwrap()
            .unwrap();
        let keys = exprs[0].evaluate(&batch).unwrap().into_array(3).unwrap();
        let days = datafusion::arrow::compute::cast(
            &keys,
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )
        .unwrap();
        let days = days
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap();
        assert_eq!(days.len(), 3);
        assert_eq!(days.value(0), jan_1_utc);
        assert_eq!(days.value(1), jan_1_utc);
        assert_eq!(days.value(2), jan_1_utc + 24 * hour);
    }

    #[test]
    fn a_broadcast_table_counts_on_a_task_on_workers_and_on_every_task_in_one_process() {
        let gib = 1 << 30;
        let workers = PlanMode::Distributed {
            task_memory: Some(gib),
        };
        assert_eq!(workers.broadcast_memory(), Some(gib));
        let one_process = PlanMode::SingleProcess {
            tasks: 2,
            task_memory: Some(gib),
        };
        assert_eq!(one_process.broadcast_memory(), Some(2 * gib));
        assert_eq!(PlanMode::default().broadcast_memory(), None);
    }

    /// A 40 MB dimension (five million keys) joined to a 48 MB fact: broadcast when a task
    /// has 1 GiB (threshold 128 MiB), shuffled with the fact when it has 128 MiB (32 MiB).
    #[tokio::test]
    async fn the_broadcast_threshold_follows_the_memory_of_a_task() {
        let plan_with = |task_memory: u64| async move {
            let ctx = crate::session::new_session(crate::session::SessionOptions {
                partitions: 2,
                task_memory: PlanMode::Distributed {
                    task_memory: Some(task_memory),
                }
                .broadcast_memory(),
                ..Default::default()
            });
            let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
            let keys = |range: std::ops::Range<i64>| {
                RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(Int64Array::from_iter_values(range))],
                )
                .unwrap()
            };
            let dim = MemTable::try_new(schema.clone(), vec![vec![keys(0..5_000_000)]]).unwrap();
            let fact = MemTable::try_new(
                schema.clone(),
                vec![vec![keys(0..3_000_000)], vec![keys(3_000_000..6_000_000)]],
            )
            .unwrap();
            ctx.register_table("dim", Arc::new(dim)).unwrap();
            ctx.register_table("fact", Arc::new(fact)).unwrap();
            let options = PlanOptions {
                mode: PlanMode::Distributed {
                    task_memory: Some(task_memory),
                },
                partition_by: Vec::new(),
            };
            let query = "SELECT fact.k FROM fact JOIN dim ON fact.k = dim.k";
            plan_job(&ctx, &JobId::parse("j").unwrap(), query, &options)
                .await
                .unwrap()
                .describe()
        };
        let roomy = plan_with(1 << 30).await;
        assert!(roomy.contains("mode=CollectLeft"), "{roomy}");
        let tight = plan_with(128 << 20).await;
        assert!(!tight.contains("mode=CollectLeft"), "{tight}");
        assert!(tight.contains("mode=Partitioned"), "{tight}");
    }

    /// A session planning `partitions` partitions per stage.
    fn session_with_partitions(partitions: usize) -> SessionContext {
        let ctx = crate::session::new_session(crate::session::SessionOptions::default());
        ctx.state_ref()
            .write()
            .config_mut()
            .options_mut()
            .execution
            .target_partitions = partitions;
        ctx
    }

    /// `LIMIT n` over a source read in four partitions: `n` rows in all, not per partition;
    /// without a limit the merge goes and the partitions are written in parallel.
    #[tokio::test]
    async fn a_bare_limit_bounds_the_whole_result_not_each_partition() {
        let ctx = session_with_partitions(4);
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true)]));
        let part = |from: i64| {
            vec![
                RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(Int64Array::from_iter_values(from..from + 10))],
                )
                .unwrap(),
            ]
        };
        let table =
            MemTable::try_new(schema.clone(), (0..4).map(|p| part(p * 100)).collect()).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        for (query, rows, partitions) in [
            ("SELECT k FROM t LIMIT 10", 10, 1),
            ("SELECT k FROM t WHERE k % 2 = 0 LIMIT 3", 3, 1),
            ("SELECT k FROM t", 40, 4),
        ] {
            let physical = ctx
                .sql(query)
                .await
                .unwrap()
                .create_physical_plan()
                .await
                .unwrap();
            let physical = strip_final_coalesce(physical);
            let batches = datafusion::physical_plan::collect_partitioned(physical, ctx.task_ctx())
                .await
                .unwrap();
            let total: usize = batches.iter().flatten().map(RecordBatch::num_rows).sum();
            assert_eq!((total, batches.len()), (rows, partitions), "{query}");
        }
    }

    #[tokio::test]
    async fn renumbered_stages_still_read_each_other() {
        let ctx = session_with_partitions(2);
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![1, 2, 2]))],
        )
        .unwrap();
        let table = MemTable::try_new(schema, vec![vec![batch.clone()], vec![batch]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        let options = PlanOptions {
            mode: PlanMode::Distributed { task_memory: None },
            partition_by: Vec::new(),
        };
        let query = "SELECT k, COUNT(*) AS n FROM t GROUP BY k HAVING COUNT(*) > 1";
        let plan = plan_job(&ctx, &JobId::parse("j").unwrap(), query, &options)
            .await
            .unwrap();
        let before: Vec<(u32, Vec<StageId>)> = plan
            .stages
            .iter()
            .map(|s| (s.id.0, s.upstream.clone()))
            .collect();
        assert!(before.len() >= 2, "{before:?}");
        let moved = renumber_stages(plan, 7).unwrap();
        for (stage, (id, upstream)) in moved.stages.iter().zip(&before) {
            assert_eq!(stage.id.0, id + 7);
            assert_eq!(stage.plan.stage_id() as u32, id + 7);
            let expected: Vec<u32> = upstream.iter().map(|s| s.0 + 7).collect();
            assert_eq!(
                stage.upstream.iter().map(|s| s.0).collect::<Vec<_>>(),
                expected
            );
            // The placeholders inside the stage name the moved stages too.
            let as_plan: Arc<dyn ExecutionPlan> = stage.plan.clone();
            assert_eq!(upstream_stages(&as_plan).unwrap(), expected);
        }
        assert!(moved.stages.last().unwrap().is_final);
    }
}
