//! Integer arithmetic and `SUM` that fail on overflow instead of wrapping.
//!
//! DataFusion 53 adds, subtracts and multiplies integers with wrapping kernels, and its
//! `SUM` of integers wraps too (as Spark does without ANSI mode): a nightly total past
//! `i64::MAX` was published as a large negative number, with exit 0. A published value
//! must be what the SQL means or the job must fail, as DuckDB, Trino and PostgreSQL do.
//!
//! - [`CheckIntegerOverflow`], an analyzer rule, turns `a + b`, `a - b` and `a * b` of two
//!   integers into `nightshift_checked_add(a, b)` (and `_subtract`, `_multiply`), which call
//!   arrow's checked kernels; output column names are kept.
//! - [`CheckedSum`] replaces DataFusion's `sum`: a sum of integers is DataFusion's own sum
//!   over `decimal(38, 0)` (which cannot overflow for fewer than 2^64 rows), narrowed back to
//!   the integer type at the end, failing if it does not fit. Partial sums between stages
//!   are decimals. Other types go to DataFusion's sum unchanged.
//!
//! Both are registered by name, so a worker decoding a stage plan finds the same functions.
//! A unary minus of an integer is `0 - x`, checked the same way; the predicates of row
//! `[[check]]`s, compiled outside a query, go through [`checked`]. `abs` of the smallest
//! integer is refused by arrow's own kernel ("Int64Array overflow on abs(...)").

use std::any::Any;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Datum};
use datafusion::arrow::compute::kernels::numeric;
use datafusion::arrow::compute::{CastOptions, cast, cast_with_options};
use datafusion::arrow::datatypes::{
    DataType, Decimal128Type, Field, FieldRef, Int64Type, UInt64Type,
};
use datafusion::arrow::error::ArrowError;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, Result, ScalarValue, exec_err, internal_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::{AggregateOrderSensitivity, merge_schema};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, BinaryExpr, ColumnarValue, Documentation, EmitTo,
    Expr, ExprSchemable, GroupsAccumulator, LogicalPlan, Operator, ReversedUDAF,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, SetMonotonicity, Signature, Volatility,
};
use datafusion::optimizer::AnalyzerRule;
use datafusion::physical_expr_common::datum::apply;
use datafusion::prelude::SessionContext;

/// Registers the checked functions, the checked `sum` and the rule that uses them.
pub fn register(ctx: &SessionContext) {
    for op in IntegerOp::ALL {
        ctx.register_udf(ScalarUDF::new_from_impl(CheckedArithmetic::new(op)));
    }
    if let Some(inner) = ctx.state().aggregate_functions().get("sum") {
        ctx.register_udaf(AggregateUDF::new_from_impl(CheckedSum {
            inner: inner.clone(),
        }));
    }
    ctx.add_analyzer_rule(Arc::new(CheckIntegerOverflow));
}

/// An integer operator the rule makes checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntegerOp {
    Add,
    Subtract,
    Multiply,
}

impl IntegerOp {
    const ALL: [IntegerOp; 3] = [IntegerOp::Add, IntegerOp::Subtract, IntegerOp::Multiply];

    /// The checked operator standing for `op`, if it is one DataFusion wraps.
    pub fn of(op: Operator) -> Option<IntegerOp> {
        match op {
            Operator::Plus => Some(IntegerOp::Add),
            Operator::Minus => Some(IntegerOp::Subtract),
            Operator::Multiply => Some(IntegerOp::Multiply),
            _ => None,
        }
    }

    /// The name the checked function is registered under.
    pub fn function_name(self) -> &'static str {
        match self {
            IntegerOp::Add => "nightshift_checked_add",
            IntegerOp::Subtract => "nightshift_checked_subtract",
            IntegerOp::Multiply => "nightshift_checked_multiply",
        }
    }

    fn kernel(self, left: &dyn Datum, right: &dyn Datum) -> Result<ArrayRef, ArrowError> {
        match self {
            IntegerOp::Add => numeric::add(left, right),
            IntegerOp::Subtract => numeric::sub(left, right),
            IntegerOp::Multiply => numeric::mul(left, right),
        }
    }
}

/// Whether `a <op> b` of these operand types is one the rule makes checked: two integers
/// of one type (type coercion has already cast the narrower side).
pub fn is_checked_operation(left: &DataType, right: &DataType) -> bool {
    left.is_integer() && left == right
}

/// `a <op> b` for integers, failing on overflow.
#[derive(Debug, PartialEq, Eq, Hash)]
struct CheckedArithmetic {
    op: IntegerOp,
    signature: Signature,
}

impl CheckedArithmetic {
    fn new(op: IntegerOp) -> Self {
        CheckedArithmetic {
            op,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for CheckedArithmetic {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        self.op.function_name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types {
            [left, right] if is_checked_operation(left, right) => Ok(left.clone()),
            _ => exec_err!(
                "{} takes two integers of one type, not {arg_types:?}",
                self.name()
            ),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [left, right] = args.args.as_slice() else {
            return internal_err!("{} takes two arguments", self.name());
        };
        let data_type = left.data_type();
        apply(left, right, |l, r| self.op.kernel(l, r)).map_err(|e| match e {
            datafusion::error::DataFusionError::ArrowError(inner, _)
                if matches!(*inner, ArrowError::ArithmeticOverflow(_)) =>
            {
                datafusion::error::DataFusionError::Execution(overflow_message(
                    &inner.to_string(),
                    &data_type,
                ))
            }
            other => other,
        })
    }

    fn documentation(&self) -> Option<&Documentation> {
        None
    }
}

/// The error for an integer operation that overflowed: arrow's message names the operands.
fn overflow_message(arrow_message: &str, data_type: &DataType) -> String {
    let detail = arrow_message
        .rsplit_once("Overflow happened on: ")
        .map_or(arrow_message, |(_, operands)| operands);
    format!(
        "integer overflow: {detail} does not fit {data_type}; cast an operand to a wider \
         type or to decimal first"
    )
}

/// Rewrites integer `+`, `-` and `*` into their checked functions (see the module docs).
#[derive(Debug, Default)]
pub struct CheckIntegerOverflow;

impl AnalyzerRule for CheckIntegerOverflow {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(checked_plan)
            .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "nightshift_check_integer_overflow"
    }
}

fn checked_plan(plan: LogicalPlan) -> Result<Transformed<LogicalPlan>> {
    if matches!(plan, LogicalPlan::TableScan(_)) {
        return Ok(Transformed::no(plan));
    }
    let schema = merge_schema(&plan.inputs());
    let names = NamePreserver::new(&plan);
    plan.map_expressions(|expr| {
        let saved = names.save(&expr);
        let rewritten = expr.transform_up(|e| checked_expr(e, &schema))?;
        Ok(if rewritten.transformed {
            rewritten.update_data(|e| saved.restore(e))
        } else {
            rewritten
        })
    })
}

/// `expr` (over `schema`'s columns) type-coerced and with its integer arithmetic checked,
/// for an expression compiled outside a query: a row `[[check]]`'s predicate
/// (`checks::compile_row_checks`), which no analyzer rule sees.
pub fn checked(expr: Expr, schema: &DFSchema) -> Result<Expr> {
    use datafusion::logical_expr::simplify::SimplifyContext;
    use datafusion::optimizer::simplify_expressions::ExprSimplifier;
    let context = SimplifyContext::default().with_schema(Arc::new(schema.clone()));
    let coerced = ExprSimplifier::new(context).coerce(expr, schema)?;
    Ok(coerced.transform_up(|e| checked_expr(e, schema))?.data)
}

/// `e` with an integer `+`, `-`, `*` or unary `-` at its root made a checked call.
fn checked_expr(e: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    if let Expr::Negative(inner) = &e {
        return match inner.get_type(schema) {
            // `-x` is `0 - x`, which overflows for the smallest value as `-x` does.
            Ok(t) if t.is_signed_integer() => {
                let Expr::Negative(inner) = e else {
                    unreachable!("matched above")
                };
                let zero = Expr::Literal(ScalarValue::new_zero(&t)?, None);
                Ok(Transformed::yes(checked_call(
                    IntegerOp::Subtract,
                    zero,
                    *inner,
                )))
            }
            _ => Ok(Transformed::no(e)),
        };
    }
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = &e else {
        return Ok(Transformed::no(e));
    };
    let Some(op) = IntegerOp::of(*op) else {
        return Ok(Transformed::no(e));
    };
    let (Ok(left_type), Ok(right_type)) = (left.get_type(schema), right.get_type(schema)) else {
        return Ok(Transformed::no(e));
    };
    if !is_checked_operation(&left_type, &right_type) {
        return Ok(Transformed::no(e));
    }
    let Expr::BinaryExpr(BinaryExpr { left, right, .. }) = e else {
        unreachable!("matched above")
    };
    Ok(Transformed::yes(checked_call(op, *left, *right)))
}

/// `left <op> right` as a call of the checked function.
fn checked_call(op: IntegerOp, left: Expr, right: Expr) -> Expr {
    let function = Arc::new(ScalarUDF::new_from_impl(CheckedArithmetic::new(op)));
    Expr::ScalarFunction(ScalarFunction::new_udf(function, vec![left, right]))
}

/// The type an integer sum is kept in until its end.
const WIDE: DataType = DataType::Decimal128(38, 0);

/// Whether a sum returning `data_type` is one [`CheckedSum`] checks.
fn is_integer_sum(data_type: &DataType) -> bool {
    data_type.is_integer()
}

/// DataFusion's `sum` (`inner`), with integer sums kept in `decimal(38, 0)` and checked
/// when narrowed back (see the module docs).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CheckedSum {
    inner: Arc<AggregateUDF>,
}

/// `args` with the input and the result as [`WIDE`], for the inner sum.
fn wide_fields(count: usize) -> Vec<FieldRef> {
    (0..count)
        .map(|i| Arc::new(Field::new(format!("wide_{i}"), WIDE, true)))
        .collect()
}

fn wide_result(name: &str) -> FieldRef {
    Arc::new(Field::new(name, WIDE, true))
}

impl AggregateUDFImpl for CheckedSum {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        "sum"
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        if !is_integer_sum(args.return_field.data_type()) {
            return self.inner.accumulator(args);
        }
        Ok(Box::new(Checked::made_wide(args, |wide| {
            self.inner.accumulator(wide)
        })?))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        if !is_integer_sum(args.return_type()) {
            return self.inner.state_fields(args);
        }
        let fields = wide_fields(args.input_fields.len());
        self.inner.state_fields(StateFieldsArgs {
            return_field: wide_result(args.return_field.name()),
            input_fields: &fields,
            ..args
        })
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        self.inner.groups_accumulator_supported(args)
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        if !is_integer_sum(args.return_field.data_type()) {
            return self.inner.create_groups_accumulator(args);
        }
        Ok(Box::new(Checked::made_wide(args, |wide| {
            self.inner.create_groups_accumulator(wide)
        })?))
    }

    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        if !is_integer_sum(args.return_field.data_type()) {
            return self.inner.create_sliding_accumulator(args);
        }
        Ok(Box::new(Checked::made_wide(args, |wide| {
            self.inner.create_sliding_accumulator(wide)
        })?))
    }

    fn reverse_expr(&self) -> ReversedUDAF {
        ReversedUDAF::Identical
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        AggregateOrderSensitivity::Insensitive
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn set_monotonicity(&self, data_type: &DataType) -> SetMonotonicity {
        self.inner.inner().set_monotonicity(data_type)
    }
}

/// `values` as [`WIDE`], for the inner sum. The sum's inputs are `bigint` or unsigned
/// `bigint` (its signature coerces narrower integers), widened value by value; arrow's
/// cast would multiply each by 10^0 with an overflow check.
fn widened(values: &[ArrayRef]) -> Result<Vec<ArrayRef>> {
    values
        .iter()
        .map(|v| {
            let wide: ArrayRef = match v.data_type() {
                DataType::Int64 => Arc::new(
                    v.as_primitive::<Int64Type>()
                        .unary::<_, Decimal128Type>(i128::from)
                        .with_precision_and_scale(38, 0)?,
                ),
                DataType::UInt64 => Arc::new(
                    v.as_primitive::<UInt64Type>()
                        .unary::<_, Decimal128Type>(i128::from)
                        .with_precision_and_scale(38, 0)?,
                ),
                _ => cast(v, &WIDE)?,
            };
            Ok(wide)
        })
        .collect()
}

/// The sums in `wide` as `output`, failing on the first that does not fit, naming the
/// aggregate (`sum(orders.amount)`) and the sum.
fn narrowed(wide: &ArrayRef, output: &DataType, name: &str) -> Result<ArrayRef> {
    let strict = CastOptions {
        safe: false,
        ..Default::default()
    };
    let fits = match output {
        DataType::Int64 => wide
            .as_primitive::<Decimal128Type>()
            .try_unary::<_, Int64Type, _>(|v| i64::try_from(v).map_err(|_| overflow()))
            .map(|a| Arc::new(a) as ArrayRef),
        DataType::UInt64 => wide
            .as_primitive::<Decimal128Type>()
            .try_unary::<_, UInt64Type, _>(|v| u64::try_from(v).map_err(|_| overflow()))
            .map(|a| Arc::new(a) as ArrayRef),
        _ => cast_with_options(wide, output, &strict),
    };
    fits.or_else(|_| {
        let safe = cast(wide, output)?;
        let first = (0..wide.len())
            .find(|&i| wide.is_valid(i) && safe.is_null(i))
            .map(|i| ScalarValue::try_from_array(wide, i).map(|v| v.to_string()))
            .transpose()?
            .unwrap_or_default();
        exec_err!(
            "integer overflow: {name} is {first}, which does not fit {output}; sum a \
             decimal (CAST(x AS DECIMAL(38, 0))) instead"
        )
    })
}

fn overflow() -> ArrowError {
    ArrowError::ComputeError("the sum does not fit".into())
}

/// An accumulator of an integer sum (`Box<dyn Accumulator>` or `Box<dyn
/// GroupsAccumulator>`): the inner one sums decimals, the end is narrowed to `output`.
#[derive(Debug)]
struct Checked<A> {
    inner: A,
    output: DataType,
    /// The aggregate as the plan shows it (`sum(orders.amount)`), for the error.
    name: String,
}

impl<A> Checked<A> {
    /// Makes the inner accumulator with `make` (one of the inner sum's constructors) from
    /// `args` with the input and the result as [`WIDE`].
    fn made_wide(
        args: AccumulatorArgs,
        make: impl FnOnce(AccumulatorArgs) -> Result<A>,
    ) -> Result<Self> {
        let output = args.return_field.data_type().clone();
        let name = args.name.to_string();
        let fields = wide_fields(args.expr_fields.len());
        let inner = make(AccumulatorArgs {
            return_field: wide_result(args.return_field.name()),
            expr_fields: &fields,
            ..args
        })?;
        Ok(Checked {
            inner,
            output,
            name,
        })
    }
}

impl Accumulator for Checked<Box<dyn Accumulator>> {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.inner.update_batch(&widened(values)?)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let wide = self.inner.evaluate()?.to_array()?;
        ScalarValue::try_from_array(&narrowed(&wide, &self.output, &self.name)?, 0)
    }

    fn size(&self) -> usize {
        self.inner.size() + self.name.len()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.inner.state()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.inner.merge_batch(states)
    }

    fn retract_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.inner.retract_batch(&widened(values)?)
    }

    fn supports_retract_batch(&self) -> bool {
        self.inner.supports_retract_batch()
    }
}

impl GroupsAccumulator for Checked<Box<dyn GroupsAccumulator>> {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.inner.update_batch(
            &widened(values)?,
            group_indices,
            opt_filter,
            total_num_groups,
        )
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        narrowed(&self.inner.evaluate(emit_to)?, &self.output, &self.name)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        self.inner.state(emit_to)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.inner
            .merge_batch(values, group_indices, opt_filter, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        self.inner.convert_to_state(&widened(values)?, opt_filter)
    }

    fn supports_convert_to_state(&self) -> bool {
        self.inner.supports_convert_to_state()
    }

    fn size(&self) -> usize {
        self.inner.size() + self.name.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::Schema;
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::datasource::MemTable;

    fn context_with(values: Vec<Option<i64>>, groups: Vec<i64>) -> SessionContext {
        let ctx = SessionContext::new();
        register(&ctx);
        let schema = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, true),
            Field::new("g", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(values)),
                Arc::new(Int64Array::from(groups)),
            ],
        )
        .unwrap();
        // Two partitions: partial sums meet in a final aggregation.
        let table = MemTable::try_new(schema, vec![vec![batch.clone()], vec![batch]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx
    }

    async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
        ctx.sql(sql).await?.collect().await
    }

    /// The error `sql` fails with in `ctx`, which must be an integer overflow.
    async fn overflow(ctx: &SessionContext, sql: &str) -> String {
        let err = run(ctx, sql)
            .await
            .err()
            .unwrap_or_else(|| panic!("{sql} passed"))
            .to_string();
        assert!(err.contains("integer overflow"), "{sql}: {err}");
        err
    }

    async fn single_i64(ctx: &SessionContext, sql: &str) -> Result<Option<i64>> {
        let batches = run(ctx, sql).await?;
        let column = batches[0].column(0);
        let ints = column.as_any().downcast_ref::<Int64Array>().unwrap();
        Ok(ints.is_valid(0).then(|| ints.value(0)))
    }

    #[test]
    fn only_two_integers_of_one_type_are_checked() {
        assert!(is_checked_operation(&DataType::Int64, &DataType::Int64));
        assert!(is_checked_operation(&DataType::UInt8, &DataType::UInt8));
        assert!(!is_checked_operation(&DataType::Int32, &DataType::Int64));
        assert!(!is_checked_operation(
            &DataType::Float64,
            &DataType::Float64
        ));
        assert!(!is_checked_operation(
            &DataType::Decimal128(10, 2),
            &DataType::Decimal128(10, 2)
        ));
        assert_eq!(IntegerOp::of(Operator::Plus), Some(IntegerOp::Add));
        assert_eq!(IntegerOp::of(Operator::Divide), None);
    }

    #[tokio::test]
    async fn an_integer_sum_past_its_type_fails_naming_the_sum() {
        let big = i64::MAX / 2 + 1;
        let ctx = context_with(vec![Some(big), Some(1)], vec![1, 1]);
        let message = overflow(&ctx, "SELECT SUM(v) FROM t").await;
        assert!(message.contains("sum(t.v)"), "{message}");
        overflow(&ctx, "SELECT g, SUM(v) AS total FROM t GROUP BY g").await;
    }

    #[tokio::test]
    async fn a_sum_that_fits_is_exact_even_past_the_type_half_way() {
        // Partial sums pass i64::MAX and come back: kept wide, the end fits.
        let ctx = context_with(
            vec![Some(i64::MAX), Some(1), Some(-i64::MAX), Some(-1), None],
            vec![1, 1, 1, 1, 2],
        );
        assert_eq!(
            single_i64(&ctx, "SELECT SUM(v) FROM t").await.unwrap(),
            Some(0)
        );
        let batches = run(&ctx, "SELECT g, SUM(v) AS s FROM t GROUP BY g ORDER BY g")
            .await
            .unwrap();
        let sums = batches[0]
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(sums.value(0), 0);
        assert!(sums.is_null(1), "a group of nulls sums to null");
        assert_eq!(
            run(&ctx, "SELECT SUM(v) FROM t").await.unwrap()[0]
                .schema()
                .field(0)
                .data_type(),
            &DataType::Int64,
            "the result keeps its integer type"
        );
    }

    #[tokio::test]
    async fn window_and_distinct_sums_are_checked() {
        let ctx = context_with(vec![Some(i64::MAX), Some(1)], vec![1, 2]);
        overflow(
            &ctx,
            "SELECT SUM(v) OVER (ORDER BY g ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM t",
        )
        .await;
        overflow(&ctx, "SELECT SUM(DISTINCT v) FROM t").await;
    }

    #[tokio::test]
    async fn integer_arithmetic_that_overflows_fails_naming_the_operands() {
        let ctx = context_with(vec![Some(i64::MAX)], vec![1]);
        for sql in [
            "SELECT v + g FROM t",
            "SELECT -v - 2 * g FROM t",
            "SELECT v * 2 FROM t",
            "SELECT CAST(v / 4294967296 AS INT) * CAST(v / 4294967296 AS INT) FROM t",
            "SELECT -(-v - g) FROM t",
        ] {
            overflow(&ctx, sql).await;
        }
        let err = overflow(&ctx, "SELECT v + g FROM t").await;
        assert!(err.contains("9223372036854775807 + 1"), "{err}");
        let err = run(&ctx, "SELECT abs(-v - g) FROM t").await.unwrap_err();
        assert!(err.to_string().contains("overflow on abs"), "{err}");
    }

    /// A row check's predicate, compiled outside a query, is checked too.
    #[test]
    fn an_expression_compiled_outside_a_query_is_checked() {
        let ctx = SessionContext::new();
        let schema = Schema::new(vec![Field::new("v", DataType::Int32, true)]);
        let df_schema = DFSchema::try_from(schema.clone()).unwrap();
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![Arc::new(datafusion::arrow::array::Int32Array::from(vec![
                i32::MAX,
            ]))],
        )
        .unwrap();
        let compiled = |sql: &str| {
            let expr = ctx.parse_sql_expr(sql, &df_schema).unwrap();
            let expr = checked(expr, &df_schema).unwrap();
            ctx.create_physical_expr(expr, &df_schema).unwrap()
        };
        let err = compiled("v * v > 0").evaluate(&batch).unwrap_err();
        assert!(err.to_string().contains("integer overflow"), "{err}");
        // An int and a bigint literal are coerced first, then added as bigints: it fits.
        let fits = compiled("v + 1 > 0").evaluate(&batch).unwrap();
        let fits = fits.into_array(1).unwrap();
        assert!(fits.as_boolean().value(0));
    }

    #[tokio::test]
    async fn arithmetic_that_fits_keeps_its_values_and_names() {
        let ctx = context_with(vec![Some(40), None], vec![2, 3]);
        let batches = run(
            &ctx,
            "SELECT v + g, v * g - 1 AS m, SUM(v + 1) FROM t GROUP BY v, g ORDER BY g",
        )
        .await
        .unwrap();
        let schema = batches[0].schema();
        assert_eq!(schema.field(0).name(), "t.v + t.g");
        assert_eq!(schema.field(1).name(), "m");
        assert_eq!(schema.field(2).name(), "sum(t.v + Int64(1))");
        let first = batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(first.value(0), 42);
        assert!(first.is_null(1));
        // Floats and decimals are not integers and are left to DataFusion.
        let batches = run(&ctx, "SELECT CAST(v AS DOUBLE) * 1e308 FROM t WHERE v = 40")
            .await
            .unwrap();
        assert_eq!(batches[0].num_rows(), 1);
    }
}
