//! The `not null` check of a source's schema contract, as a plan node right above the scan.
//!
//! [`NotNullCheckExec`] passes its input's batches through unchanged (its schema declares the
//! checked columns non-nullable) and fails the task on a null in a checked column. It lets
//! filters through to the scan below (Parquet statistics and row-group pruning use them) and
//! is not merged into the scan's projection, unlike an expression would be. Rows a pushed-down
//! filter skips are not checked; they could not reach the result either.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::config::ConfigOptions;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::filter_pushdown::{
    ChildPushdownResult, FilterDescription, FilterPushdownPhase, FilterPushdownPropagation,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;

/// A column to check and the message of its failure.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NotNullCheck {
    pub column: String,
    pub message: String,
}

/// Fails on a null in any of `checks`' columns of its input; see the module documentation.
#[derive(Debug)]
pub struct NotNullCheckExec {
    input: Arc<dyn ExecutionPlan>,
    checks: Vec<NotNullCheck>,
    /// Input column index of each check present in the input.
    indices: Vec<(usize, usize)>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl NotNullCheckExec {
    /// Checks the columns of `checks` that `input` outputs (a scan may project others away).
    pub fn new(input: Arc<dyn ExecutionPlan>, checks: Vec<NotNullCheck>) -> Self {
        let input_schema = input.schema();
        let indices: Vec<(usize, usize)> = checks
            .iter()
            .enumerate()
            .filter_map(|(c, check)| input_schema.index_of(&check.column).ok().map(|i| (i, c)))
            .collect();
        let fields = input_schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if indices.iter().any(|(index, _)| *index == i) {
                    Arc::new(f.as_ref().clone().with_nullable(false))
                } else {
                    f.clone()
                }
            })
            .collect::<Vec<_>>();
        let schema = Arc::new(Schema::new_with_metadata(
            fields,
            input_schema.metadata().clone(),
        ));
        let input_properties = input.properties();
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            input_properties.output_partitioning().clone(),
            input_properties.emission_type,
            input_properties.boundedness,
        ));
        NotNullCheckExec {
            input,
            checks,
            indices,
            schema,
            properties,
        }
    }

    pub fn checks(&self) -> &[NotNullCheck] {
        &self.checks
    }
}

impl DisplayAs for NotNullCheckExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let names: Vec<&str> = self
            .indices
            .iter()
            .map(|(_, c)| self.checks[*c].column.as_str())
            .collect();
        write!(f, "NotNullCheckExec: columns=[{}]", names.join(", "))
    }
}

impl ExecutionPlan for NotNullCheckExec {
    fn name(&self) -> &str {
        "NotNullCheckExec"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.as_slice() {
            [child] => Ok(Arc::new(NotNullCheckExec::new(
                child.clone(),
                self.checks.clone(),
            ))),
            _ => Err(DataFusionError::Internal(
                "NotNullCheckExec has one child".into(),
            )),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let schema = self.schema.clone();
        let indices = self.indices.clone();
        let checks = self.checks.clone();
        let batch_schema = schema.clone();
        let stream = input.map(move |batch| {
            let batch = batch?;
            for (index, check) in &indices {
                let nulls = batch.column(*index).null_count();
                if nulls > 0 {
                    return Err(DataFusionError::Execution(format!(
                        "{}: found {nulls} null value(s) in a batch of {} row(s)",
                        checks[*check].message,
                        batch.num_rows()
                    )));
                }
            }
            Ok(RecordBatch::try_new(
                batch_schema.clone(),
                batch.columns().to_vec(),
            )?)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }

    fn gather_filters_for_pushdown(
        &self,
        _phase: FilterPushdownPhase,
        parent_filters: Vec<Arc<dyn PhysicalExpr>>,
        _config: &ConfigOptions,
    ) -> Result<FilterDescription> {
        FilterDescription::from_children(parent_filters, &self.children())
    }

    fn handle_child_pushdown_result(
        &self,
        _phase: FilterPushdownPhase,
        child_pushdown_result: ChildPushdownResult,
        _config: &ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn ExecutionPlan>>> {
        Ok(FilterPushdownPropagation::if_all(child_pushdown_result))
    }
}
