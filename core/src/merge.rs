//! `mode = "merge"`: the job's SQL becomes a copy-on-write upsert.
//!
//! The result's rows (the changes) replace the table's rows with the same `merge_keys`, and
//! the rest are inserted; changes matching `delete_when` delete their key's row instead. The
//! job computes the table's whole new content — the current snapshot's rows whose keys the
//! changes do not hold, plus the changes that are not deletes — and commits it as one
//! overwrite snapshot that must build on the snapshot it read (a commit in between fails the
//! job, which can then run again). A key held twice by the changes, or a null key, fails the
//! job with the key named: both are checked where the rows are, by the workers.

use std::any::Any;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

/// The name the target table's current snapshot is registered under.
pub const TARGET_VIEW: &str = "__nightshift_merge_target";
/// `nightshift_require_unique_key(count, key_text)`: true, or an error naming the key.
pub const REQUIRE_UNIQUE_KEY_UDF: &str = "nightshift_require_unique_key";

fn quote(column: &str) -> String {
    format!("\"{}\"", column.replace('"', "\"\""))
}

/// The SQL of a merge: `changes_sql` is the pipeline's SQL, `columns` its result columns,
/// `keys` the merge keys (among `columns`). With `target_columns` (the table's, with their
/// types), the current rows are read from [`TARGET_VIEW`]: a result column the table lacks
/// as null, one the result widens (`int` to `bigint`) cast to the result's type (a union
/// takes its first side's types, and the spec's `schema_evolution` decides by the union's);
/// without (no table or no snapshot yet) the result is the changes.
pub fn merge_sql(
    changes_sql: &str,
    columns: &[(String, DataType)],
    keys: &[String],
    delete_when: Option<&str>,
    target_columns: Option<&[(String, DataType)]>,
) -> String {
    let list = |prefix: &str| {
        columns
            .iter()
            .map(|(c, _)| format!("{prefix}{}", quote(c)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let key_list = keys.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
    let key_text = keys
        .iter()
        .map(|k| format!("CAST({} AS VARCHAR)", quote(k)))
        .collect::<Vec<_>>()
        .join(", ");
    // Null keys never match a row: name them instead of inserting them again every run.
    let checked: Vec<String> = columns
        .iter()
        .map(|(c, _)| {
            if keys.contains(c) {
                format!(
                    "nightshift_require_not_null({q}, 'merge key {c} is null in the result') AS {q}",
                    q = quote(c),
                    c = c.replace('\'', "''")
                )
            } else {
                quote(c)
            }
        })
        .collect();
    let typed_changes = match target_columns {
        Some(table) => format!(
            "SELECT {} FROM ({changes_sql}) __nightshift_r",
            in_table_types(columns, table).join(", ")
        ),
        None => changes_sql.to_string(),
    };
    let changes = format!(
        "__nightshift_counted AS (SELECT *, COUNT(*) OVER (PARTITION BY {key_list}) AS __nightshift_n, \
         CONCAT_WS(', ', {key_text}) AS __nightshift_key FROM ({typed_changes}) __nightshift_c), \
         __nightshift_changes AS (SELECT {checked} FROM __nightshift_counted \
         WHERE {REQUIRE_UNIQUE_KEY_UDF}(__nightshift_n, __nightshift_key))",
        checked = checked.join(", ")
    );
    let keep = match delete_when {
        Some(predicate) => format!(" WHERE NOT COALESCE(({predicate}), false)"),
        None => String::new(),
    };
    let inserted = format!("SELECT {} FROM __nightshift_changes{keep}", list(""));
    let Some(target_columns) = target_columns else {
        return format!("WITH {changes} {inserted}");
    };
    let current = columns
        .iter()
        .map(|(c, data_type)| {
            let cast = |value: &str| {
                format!(
                    "arrow_cast({value}, '{}') AS {}",
                    data_type.to_string().replace('\'', "''"),
                    quote(c)
                )
            };
            match target_columns.iter().find(|(name, _)| name == c) {
                None => cast("NULL"),
                Some((_, table_type)) if widens(table_type, data_type) => {
                    cast(&format!("__nightshift_t.{}", quote(c)))
                }
                Some(_) => format!("__nightshift_t.{}", quote(c)),
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let matched = keys
        .iter()
        .map(|k| format!("__nightshift_m.{q} = __nightshift_t.{q}", q = quote(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!(
        "WITH {changes} SELECT {current} FROM {TARGET_VIEW} __nightshift_t WHERE NOT EXISTS \
         (SELECT 1 FROM __nightshift_changes __nightshift_m WHERE {matched}) UNION ALL {inserted}"
    )
}

/// The result's columns as the table stores them: a column the table holds with another
/// type (a `timestamp` in nanoseconds for a table's microseconds, an `int` for a `bigint`)
/// is cast to the table's type, so keys are compared, and checked for duplicates, as the
/// rows will be stored. Compared in the result's own type, two keys equal to the microsecond
/// both landed, and a changed row missed its stored one. A column the result widens keeps
/// the result's type (the table's rows are widened instead); so does a nested one. Which
/// casts are allowed at all is the target's schema check's decision, made before.
fn in_table_types(columns: &[(String, DataType)], table: &[(String, DataType)]) -> Vec<String> {
    columns
        .iter()
        .map(
            |(c, data_type)| match table.iter().find(|(name, _)| name == c) {
                Some((_, table_type))
                    if table_type != data_type
                        && !widens(table_type, data_type)
                        && !table_type.is_nested()
                        && !data_type.is_nested() =>
                {
                    format!(
                        "arrow_cast({q}, '{}') AS {q}",
                        table_type.to_string().replace('\'', "''"),
                        q = quote(c)
                    )
                }
                _ => quote(c),
            },
        )
        .collect()
}

/// Why a merge must not run the query `plan`: a merge evaluates its SQL more than once (the
/// key ranges at planning, the keys to remove, the rows to insert), so rows that can differ
/// between evaluations remove keys that are not inserted again and insert keys that were
/// not removed. A `LIMIT` (which rows it keeps is up to the engine), and a function that is
/// not immutable (`random()`, `uuid()`, `now()`), are refused; `None`: the plan may merge.
pub fn nondeterministic_part(plan: &datafusion::logical_expr::LogicalPlan) -> Option<String> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{Expr, LogicalPlan};
    let mut found = None;
    let _ = plan.apply_with_subqueries(|node| {
        if matches!(node, LogicalPlan::Limit(_)) {
            found = Some("LIMIT".to_string());
            return Ok(TreeNodeRecursion::Stop);
        }
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Expr::ScalarFunction(f) = e
                    && f.func.signature().volatility != Volatility::Immutable
                {
                    found = Some(format!("{}()", f.name()));
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    found
}

/// Whether `to` is a type Iceberg lets a column of `from` widen to (`int` to `long`, `float`
/// to `double`, a decimal to more digits of the same scale).
fn widens(from: &DataType, to: &DataType) -> bool {
    matches!(
        (from, to),
        (DataType::Int32, DataType::Int64) | (DataType::Float32, DataType::Float64)
    ) || matches!(
        (from, to),
        (DataType::Decimal128(p1, s1), DataType::Decimal128(p2, s2)) if s1 == s2 && p2 > p1
    )
}

/// Fails when a merge key is held by more than one row of the result.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct RequireUniqueKey {
    signature: Signature,
}

impl Default for RequireUniqueKey {
    fn default() -> Self {
        RequireUniqueKey {
            signature: Signature::exact(
                vec![DataType::Int64, DataType::Utf8],
                Volatility::Volatile,
            ),
        }
    }
}

impl ScalarUDFImpl for RequireUniqueKey {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        REQUIRE_UNIQUE_KEY_UDF
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let counts = arrays[0].as_primitive::<Int64Type>();
        let keys = arrays[1].as_string::<i32>();
        if let Some(row) = (0..counts.len()).find(|&i| counts.is_valid(i) && counts.value(i) > 1) {
            return Err(DataFusionError::Execution(format!(
                "the merge result holds key ({}) in {} rows; merge_keys must identify one row",
                keys.value(row),
                counts.value(row)
            )));
        }
        Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(vec![
            true;
            counts.len()
        ]))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn typed(names: &[&str]) -> Vec<(String, DataType)> {
        names
            .iter()
            .map(|s| (s.to_string(), DataType::Utf8))
            .collect()
    }

    #[tokio::test]
    async fn a_merge_refuses_sql_whose_rows_can_differ_between_evaluations() {
        use datafusion::arrow::datatypes::{Field, Schema};
        let ctx = datafusion::prelude::SessionContext::new();
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true)]));
        let table = datafusion::datasource::MemTable::try_new(schema, vec![vec![]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        for (sql, part) in [
            ("SELECT k FROM t LIMIT 5", Some("LIMIT")),
            ("SELECT k FROM t ORDER BY k LIMIT 5", Some("LIMIT")),
            ("SELECT k FROM t WHERE random() < 0.5", Some("random()")),
            ("SELECT k, now() AS at FROM t", Some("now()")),
            (
                "SELECT k FROM t WHERE k IN (SELECT k FROM t LIMIT 1)",
                Some("LIMIT"),
            ),
            (
                "SELECT k, upper(CAST(k AS VARCHAR)) AS s FROM t WHERE k > 3 ORDER BY k",
                None,
            ),
        ] {
            let plan = ctx.sql(sql).await.unwrap().into_unoptimized_plan();
            assert_eq!(nondeterministic_part(&plan).as_deref(), part, "{sql}");
        }
    }

    #[test]
    fn the_merge_sql_keeps_unmatched_rows_and_adds_non_deleted_changes() {
        let sql = merge_sql(
            "SELECT id, v, op FROM src",
            &typed(&["id", "v", "op"]),
            &cols(&["id"]),
            Some("op = 'D'"),
            Some(&typed(&["id", "v", "op"])),
        );
        assert!(sql.contains("NOT EXISTS"), "{sql}");
        assert!(
            sql.contains("__nightshift_m.\"id\" = __nightshift_t.\"id\""),
            "{sql}"
        );
        assert!(
            sql.contains("WHERE NOT COALESCE((op = 'D'), false)"),
            "{sql}"
        );
        assert!(sql.contains("PARTITION BY \"id\""), "{sql}");
        let first = merge_sql(
            "SELECT 1 AS id",
            &typed(&["id"]),
            &cols(&["id"]),
            None,
            None,
        );
        assert!(!first.contains(TARGET_VIEW), "{first}");
    }

    #[test]
    fn a_column_the_result_widens_is_read_widened_from_the_table() {
        let result = [
            ("k".to_string(), DataType::Int64),
            ("v".to_string(), DataType::Int64),
            ("d".to_string(), DataType::Decimal128(12, 2)),
            ("f".to_string(), DataType::Float32),
        ];
        let table = [
            ("k".to_string(), DataType::Int64),
            ("v".to_string(), DataType::Int32),
            ("d".to_string(), DataType::Decimal128(10, 2)),
            ("f".to_string(), DataType::Float64),
        ];
        let sql = merge_sql(
            "SELECT * FROM src",
            &result,
            &cols(&["k"]),
            None,
            Some(&table),
        );
        assert!(
            sql.contains(
                "SELECT __nightshift_t.\"k\", arrow_cast(__nightshift_t.\"v\", 'Int64') AS \"v\", \
                 arrow_cast(__nightshift_t.\"d\", 'Decimal128(12, 2)') AS \"d\", __nightshift_t.\"f\" FROM"
            ),
            "{sql}"
        );
    }

    /// Runs the merge of `changes` into `table` (each one column `k` and a column `v`).
    async fn merged(
        table: datafusion::arrow::array::RecordBatch,
        changes: datafusion::arrow::array::RecordBatch,
    ) -> datafusion::error::Result<Vec<String>> {
        let ctx = crate::session::checking_session();
        let schema_of = |b: &datafusion::arrow::array::RecordBatch| {
            b.schema()
                .fields()
                .iter()
                .map(|f| (f.name().clone(), f.data_type().clone()))
                .collect::<Vec<_>>()
        };
        let (table_columns, change_columns) = (schema_of(&table), schema_of(&changes));
        ctx.register_batch(TARGET_VIEW, table)?;
        ctx.register_batch("changes", changes)?;
        let sql = merge_sql(
            "SELECT k, v FROM changes",
            &change_columns,
            &cols(&["k"]),
            None,
            Some(&table_columns),
        );
        let batches = ctx
            .sql(&format!("{sql} ORDER BY v"))
            .await?
            .collect()
            .await?;
        let shown = datafusion::arrow::util::pretty::pretty_format_batches(&batches)?;
        Ok(shown.to_string().lines().map(str::to_string).collect())
    }

    #[tokio::test]
    async fn keys_are_compared_in_the_tables_types() {
        use datafusion::arrow::array::{
            Int32Array, Int64Array, RecordBatch, TimestampMicrosecondArray,
            TimestampNanosecondArray,
        };
        let batch = |k: Arc<dyn Array>, v: &[i64]| {
            RecordBatch::try_from_iter([
                ("k", k),
                (
                    "v",
                    Arc::new(Int64Array::from(v.to_vec())) as Arc<dyn Array>,
                ),
            ])
            .unwrap()
        };
        // Two keys in nanoseconds equal to the microsecond the table stores: one key twice.
        let table = batch(Arc::new(TimestampMicrosecondArray::from(vec![5])), &[1]);
        let changes = batch(
            Arc::new(TimestampNanosecondArray::from(vec![7_000, 7_001])),
            &[2, 3],
        );
        let err = merged(table, changes).await.unwrap_err().to_string();
        assert!(
            err.contains("holds key (1970-01-01T00:00:00.000007) in 2 rows"),
            "{err}"
        );
        // A changed row in nanoseconds replaces its stored row.
        let table = batch(Arc::new(TimestampMicrosecondArray::from(vec![7])), &[1]);
        let changes = batch(Arc::new(TimestampNanosecondArray::from(vec![7_000])), &[2]);
        let rows = merged(table, changes).await.unwrap();
        assert_eq!(rows.len(), 5, "{rows:?}");
        assert!(rows[3].contains("| 2 "), "{rows:?}");
        // An int key into a bigint table.
        let table = batch(Arc::new(Int64Array::from(vec![7, 8])), &[1, 2]);
        let changes = batch(Arc::new(Int32Array::from(vec![7])), &[3]);
        let rows = merged(table, changes).await.unwrap();
        assert_eq!(rows.len(), 6, "{rows:?}");
        assert!(rows[3].contains("| 8 | 2 |"), "{rows:?}");
        assert!(rows[4].contains("| 7 | 3 |"), "{rows:?}");
    }

    #[test]
    fn a_column_the_table_lacks_is_null_in_its_current_rows() {
        let sql = merge_sql(
            "SELECT id, name, email FROM src",
            &typed(&["id", "name", "email"]),
            &cols(&["id"]),
            None,
            Some(&typed(&["id", "name"])),
        );
        assert!(
            sql.contains(
                "SELECT __nightshift_t.\"id\", __nightshift_t.\"name\", arrow_cast(NULL, 'Utf8') AS \"email\" FROM"
            ),
            "{sql}"
        );
    }
}
