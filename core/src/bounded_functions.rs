//! DataFusion's functions that make a value whose size an argument chooses (`repeat`,
//! `lpad`, `rpad`, `array_repeat`, `range`, `generate_series`), bounded: a call that would
//! make one value larger than [`MAX_VALUE_SIZE`] fails, naming the function and the size,
//! before anything is allocated.
//!
//! DataFusion folds constant calls while it plans, outside any memory pool: one
//! `repeat('x', 800000000)` in a job's SQL took 3 GB of the coordinator that admitted it.
//! Each function here wraps DataFusion's own, which still does the work; only
//! `invoke_with_args` looks at the arguments first.

use std::any::Any;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Int64Array};
use datafusion::arrow::compute::{cast, kernels::length::length, max, min};
use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::{Result, exec_err};
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature,
};
use datafusion::prelude::SessionContext;

/// The most bytes (`repeat`) or characters and elements (the others) one value may have.
pub const MAX_VALUE_SIZE: i64 = 64 << 20;

/// How a function's arguments say the size of the value it makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SizeRule {
    /// `repeat(text, n)`: the text's bytes times `n`.
    TextTimesCount,
    /// `lpad(text, n [, fill])`, `array_repeat(x, n)`: `n` characters or elements.
    SecondArgument,
    /// `range([start,] stop [, step])`: `(stop - start) / step` elements, for integers.
    IntegerRange,
}

/// Replaces each bounded function of `ctx` with its bounded wrapper.
pub fn register(ctx: &SessionContext) {
    let rules = [
        ("repeat", SizeRule::TextTimesCount),
        ("lpad", SizeRule::SecondArgument),
        ("rpad", SizeRule::SecondArgument),
        ("array_repeat", SizeRule::SecondArgument),
        ("range", SizeRule::IntegerRange),
        ("generate_series", SizeRule::IntegerRange),
    ];
    let state = ctx.state();
    for (name, rule) in rules {
        if let Some(inner) = state.scalar_functions().get(name) {
            ctx.register_udf(ScalarUDF::new_from_impl(Bounded {
                inner: inner.clone(),
                rule,
            }));
        }
    }
}

/// DataFusion's function `inner`, refusing values larger than [`MAX_VALUE_SIZE`].
#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    rule: SizeRule,
}

/// The values of `arg` as 64-bit integers (`None`: not numbers).
fn integers(arg: &ColumnarValue) -> Option<Int64Array> {
    let array: ArrayRef = arg.to_array(1).ok()?;
    let ints = cast(&array, &DataType::Int64).ok()?;
    ints.as_any().downcast_ref::<Int64Array>().cloned()
}

/// The largest value of `arg` as an integer (`None`: no value, or not a number).
fn max_integer(arg: &ColumnarValue) -> Option<i64> {
    max(&integers(arg)?)
}

/// The smallest value of `arg` as an integer.
fn min_integer(arg: &ColumnarValue) -> Option<i64> {
    min(&integers(arg)?)
}

/// The length in bytes of the longest text of `arg`.
fn max_text_bytes(arg: &ColumnarValue) -> Option<i64> {
    let lengths = length(&arg.to_array(1).ok()?).ok()?;
    max_integer(&ColumnarValue::Array(lengths))
}

/// The size of the largest value a call with `args` makes by `rule`, if the arguments say.
fn largest_value(rule: SizeRule, args: &[ColumnarValue]) -> Option<i64> {
    match (rule, args) {
        (SizeRule::TextTimesCount, [text, count]) => {
            Some(max_text_bytes(text)?.saturating_mul(max_integer(count)?))
        }
        (SizeRule::SecondArgument, [_, count, ..]) => max_integer(count),
        (SizeRule::IntegerRange, [stop]) => max_integer(stop),
        (SizeRule::IntegerRange, [start, stop]) => {
            Some(max_integer(stop)?.saturating_sub(min_integer(start)?))
        }
        (SizeRule::IntegerRange, [start, stop, step]) => {
            let span = max_integer(stop)?
                .saturating_sub(min_integer(start)?)
                .max(min_integer(start)?.saturating_sub(max_integer(stop)?));
            let step = max_integer(step)?
                .unsigned_abs()
                .min(min_integer(step)?.unsigned_abs())
                .max(1);
            Some(span / step.min(i64::MAX as u64) as i64)
        }
        _ => None,
    }
}

impl ScalarUDFImpl for Bounded {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if let Some(size) = largest_value(self.rule, &args.args)
            && size > MAX_VALUE_SIZE
        {
            let unit = match self.rule {
                SizeRule::TextTimesCount => "bytes",
                SizeRule::SecondArgument if self.name() == "array_repeat" => "elements",
                SizeRule::SecondArgument => "characters",
                SizeRule::IntegerRange => "elements",
            };
            return exec_err!(
                "{}() would make a value of {size} {unit}; at most {MAX_VALUE_SIZE} are allowed in one value",
                self.name()
            );
        }
        self.inner.invoke_with_args(args)
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        self.inner.simplify(args, info)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

#[cfg(test)]
mod tests {
    async fn query(sql: &str) -> std::result::Result<usize, String> {
        let ctx = crate::session::new_session(crate::session::SessionOptions::default());
        let frame = ctx.sql(sql).await.map_err(|e| e.to_string())?;
        let batches = frame.collect().await.map_err(|e| e.to_string())?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    #[tokio::test]
    async fn a_value_past_the_limit_fails_by_name_before_it_is_made() {
        for (sql, needle) in [
            (
                "SELECT repeat('x', 800000000)",
                "repeat() would make a value of 800000000 bytes",
            ),
            ("SELECT repeat('ab', 40000000)", "80000000 bytes"),
            (
                "SELECT lpad('x', 900000000)",
                "lpad() would make a value of 900000000 characters",
            ),
            ("SELECT rpad('x', 900000000, 'é')", "rpad()"),
            ("SELECT array_repeat(1, 900000000)", "900000000 elements"),
            ("SELECT range(1000000000)", "range() would make"),
            (
                "SELECT generate_series(-500000000, 500000000)",
                "generate_series()",
            ),
            ("SELECT range(0, 900000000, 2)", "450000000 elements"),
        ] {
            let err = query(sql).await.expect_err(sql);
            assert!(err.contains(needle), "{sql}: {err}");
            assert!(err.contains("at most 67108864"), "{sql}: {err}");
        }
    }

    #[tokio::test]
    async fn values_under_the_limit_are_made_as_datafusion_makes_them() {
        let ctx = crate::session::new_session(crate::session::SessionOptions::default());
        let batches = ctx
            .sql(
                "SELECT repeat(s, n) AS r, lpad(s, 5, '*') AS l, cardinality(range(n)) AS c \
                 FROM (VALUES ('ab', 3), ('é', 2), (NULL, 1)) AS t(s, n)",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        assert!(text.contains("| ababab | ***ab | 3 |"), "{text}");
        assert!(text.contains("| éé     | ****é | 2 |"), "{text}");
        assert_eq!(query("SELECT * FROM range(1000)").await, Ok(1000));
        assert_eq!(query("SELECT repeat('x', 67108864)").await, Ok(1));
    }
}
