//! The DataFusion session every planner and worker uses: Ballista's restricted settings,
//! Nightshift's UDFs and sizing. Coordinator and workers build it the same way, so a stage
//! plan decodes identically on both sides.

use std::any::Any;
use std::sync::Arc;

use ballista_core::extension::SessionConfigExt;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{DataFusionError, ScalarValue, exec_err};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;

use crate::storage::NightshiftStoreRegistry;
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::prelude::{SessionConfig, SessionContext};

/// Name of the UDF that enforces `not null` in a source's schema contract.
pub const REQUIRE_NOT_NULL_UDF: &str = "nightshift_require_not_null";

/// Sizing of a session.
#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    /// Partitions of scans and shuffles: the number of tasks per stage.
    pub partitions: usize,
    /// Rows per batch.
    pub batch_size: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            partitions: 4,
            batch_size: 8192,
        }
    }
}

/// Builds the session used to plan (coordinator) and to decode and run stage plans (worker).
pub fn new_session(options: SessionOptions) -> SessionContext {
    let config = SessionConfig::new_with_ballista()
        .with_target_partitions(options.partitions.max(1))
        .with_batch_size(options.batch_size)
        .with_information_schema(false)
        // Split scans of any size into `partitions` byte ranges: task size is set by the
        // caller through `partitions`, not by DataFusion's 10 MiB floor.
        .set_usize("datafusion.optimizer.repartition_file_min_size", 0)
        .set_bool("datafusion.execution.collect_statistics", true);
    let runtime = RuntimeEnvBuilder::new()
        .with_object_store_registry(Arc::new(NightshiftStoreRegistry))
        .build_arc()
        .expect("runtime environment");
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_runtime_env(runtime)
        .build();
    let ctx = SessionContext::new_with_state(state);
    ctx.register_udf(ScalarUDF::new_from_impl(RequireNotNull::new()));
    ctx
}

/// `nightshift_require_not_null(value, 'message')` returns `value`, or fails the task with
/// `message` if `value` holds a null. Used for `not null` columns of schema contracts.
#[derive(Debug, PartialEq, Eq, Hash)]
struct RequireNotNull {
    signature: Signature,
}

impl RequireNotNull {
    fn new() -> Self {
        RequireNotNull {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for RequireNotNull {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        REQUIRE_NOT_NULL_UDF
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(arg_types[0].clone())
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> datafusion::error::Result<FieldRef> {
        let input = &args.arg_fields[0];
        Ok(Arc::new(Field::new(
            input.name(),
            input.data_type().clone(),
            false,
        )))
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let message = match &args.args[1] {
            ColumnarValue::Scalar(ScalarValue::Utf8(Some(m))) => m.clone(),
            _ => return exec_err!("{REQUIRE_NOT_NULL_UDF} needs a string literal message"),
        };
        let nulls = match &args.args[0] {
            ColumnarValue::Array(array) => array.null_count(),
            ColumnarValue::Scalar(s) => usize::from(s.is_null()) * args.number_rows,
        };
        if nulls > 0 {
            return Err(DataFusionError::Execution(format!(
                "{message}: found {nulls} null value(s) in a batch of {} row(s)",
                args.number_rows
            )));
        }
        Ok(args.args[0].clone())
    }
}
