//! `[[check]]`: rules the published rows must satisfy, and what a failure does.
//!
//! ```toml
//! [[check]]
//! name = "amount_not_negative"
//! on = "result"          # the rows the job publishes
//! type = "range"         # not_null | accepted_values | range | regex | row_count | unique | sql | freshness | relationship
//! columns = ["amount"]
//! min = 0
//! severity = "error"     # or "warn": reported, committed anyway
//! ```
//!
//! Each row-level check becomes one SQL predicate over the result's columns
//! ([`CheckSpec::row_predicate`]) that the writing tasks count as they write; `row_count`
//! bounds the rows the job writes. `unique` and `sql` look at all the rows together: each is
//! one query over the written, not yet committed result ([`CheckSpec::set_query`]) whose
//! rows are the failures.

use std::path::Path;

use arrow_schema::DataType;
use serde::Deserialize;

use crate::error::SpecError;

/// One `[[check]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub name: String,
    /// `result` (the rows published), or the name of a `[[source]]`: its rows as the job
    /// reads them, checked before any task runs.
    #[serde(default = "result")]
    pub on: String,
    #[serde(rename = "type")]
    pub kind: CheckKind,
    #[serde(default)]
    pub columns: Vec<String>,
    /// `accepted_values`: the values allowed.
    #[serde(default)]
    pub values: Vec<toml::Value>,
    /// `range`: the smallest value allowed; `row_count`: the fewest rows.
    #[serde(default)]
    pub min: Option<toml::Value>,
    /// `range`: the largest value allowed; `row_count`: the most rows.
    #[serde(default)]
    pub max: Option<toml::Value>,
    /// `regex`: the pattern every value must match (anywhere in it; anchor with `^…$`).
    #[serde(default)]
    pub pattern: Option<String>,
    /// `sql`: a query over `result` (the rows the job is about to publish) returning the rows
    /// that break the rule; none returned passes.
    #[serde(default)]
    pub sql: Option<String>,
    /// `freshness`: how old the newest value of the column may be (`90m`, `36h`, `2d`).
    #[serde(default)]
    pub max_age: Option<String>,
    /// `relationship`: the Iceberg table (`namespace.table`) whose rows each key must match.
    #[serde(default)]
    pub to: Option<String>,
    /// `relationship`: the columns of `to` matched against `columns`, in order (default: the
    /// same names).
    #[serde(default)]
    pub to_columns: Vec<String>,
    /// `row_count`: how far the row count may move from what the pipeline's previous run
    /// published, as a percentage (`"30%"`: between 70 % and 130 % of it).
    #[serde(default)]
    pub max_change: Option<String>,
    #[serde(default)]
    pub severity: Severity,
    /// What happens to the rows a row-level check on the result fails: `"report"` (counted
    /// and judged by `severity`), or `"quarantine"`: they go to the `<table>__rejects` table
    /// with the check's name and reason, and the other rows are published.
    #[serde(default)]
    pub on_fail: OnFail,
}

/// What a row-level check does with the rows it fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFail {
    /// Counted and reported; `severity` decides whether the job fails.
    #[default]
    Report,
    /// Written to the rejects table instead of the target; the job goes on.
    Quarantine,
}

/// The table a job's quarantined rows go to: `<target>__rejects`, beside the target.
pub fn rejects_table(target: &str) -> String {
    format!("{target}{REJECTS_SUFFIX}")
}

/// What [`rejects_table`] appends to the target's name.
pub const REJECTS_SUFFIX: &str = "__rejects";

/// The rejects table's column naming the check a row failed (the first, when several).
pub const REJECT_CHECK_COLUMN: &str = "__check";
/// The rejects table's column saying why: the rule the row broke, in SQL.
pub const REJECT_REASON_COLUMN: &str = "__reason";
/// The rejects table's column naming the job that rejected the row.
pub const REJECT_JOB_COLUMN: &str = "__job_id";

/// `on` of a check on the rows the job publishes.
pub const RESULT: &str = "result";

fn result() -> String {
    RESULT.to_string()
}

/// What a check tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    NotNull,
    Unique,
    AcceptedValues,
    Range,
    Regex,
    RowCount,
    Freshness,
    Relationship,
    Sql,
}

impl CheckKind {
    fn name(self) -> &'static str {
        match self {
            CheckKind::NotNull => "not_null",
            CheckKind::Unique => "unique",
            CheckKind::AcceptedValues => "accepted_values",
            CheckKind::Range => "range",
            CheckKind::Regex => "regex",
            CheckKind::RowCount => "row_count",
            CheckKind::Freshness => "freshness",
            CheckKind::Relationship => "relationship",
            CheckKind::Sql => "sql",
        }
    }
}

/// What a failed check does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The job fails before its commit; nothing is published.
    #[default]
    Error,
    /// The failure is reported; the rows are published.
    Warn,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warn => "warn",
        })
    }
}

/// The name a `relationship` check's `to` table is registered under for its query.
pub const RELATIONSHIP_VIEW: &str = "__nightshift_relationship";

/// The column of a `unique` or `relationship` check's query holding how many rows hold the
/// key it found.
pub const DUPLICATE_ROWS_COLUMN: &str = "rows_with_this_key";

/// The column of a source `row_count` check's query holding the source's row count.
pub const ROWS_COUNTED_COLUMN: &str = "rows_counted";

impl CheckSpec {
    /// The SQL predicate every row must satisfy (false fails, NULL passes), for row-level
    /// checks; `None` for `row_count`.
    pub fn row_predicate(&self) -> Option<String> {
        let each = |f: &dyn Fn(&str) -> String| {
            self.columns
                .iter()
                .map(|c| f(&quote_identifier(c)))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        Some(match self.kind {
            CheckKind::NotNull => each(&|c| format!("{c} IS NOT NULL")),
            CheckKind::AcceptedValues => {
                let values = self
                    .values
                    .iter()
                    .map(literal)
                    .collect::<Vec<_>>()
                    .join(", ");
                each(&|c| format!("{c} IN ({values})"))
            }
            // No type is known: nothing to refuse, nothing to add for NaN.
            CheckKind::Range => return self.range_predicate(&|_| None).ok(),
            CheckKind::Regex => {
                let pattern = quote_string(self.pattern.as_deref().unwrap_or_default());
                each(&|c| format!("regexp_like(CAST({c} AS VARCHAR), {pattern})"))
            }
            _ => return None,
        })
    }

    /// [`Self::row_predicate`] for columns whose types `type_of` gives (`None`: not known).
    /// A `range` bound must be of its column's kind: a quoted `"10"` on a number column, or a
    /// number on a text column, compared as text (100 and 5 passed `"10"..."50"`), and a
    /// number on a date column was taken as days since 1970; such a bound is an error
    /// naming the check, bound and column. A float column's NaN fails the range: in the
    /// total order arrow compares by, a NaN sorted above or below every number by its sign
    /// bit, so it passed one bound and failed the other.
    pub fn typed_row_predicate(
        &self,
        type_of: &dyn Fn(&str) -> Option<DataType>,
    ) -> Result<Option<String>, String> {
        self.check_types(type_of)?;
        match self.kind {
            CheckKind::Range => self.range_predicate(type_of).map(Some),
            _ => Ok(self.row_predicate()),
        }
    }

    /// A `range` check's predicate over columns of the types `type_of` gives (see
    /// [`Self::typed_row_predicate`]).
    fn range_predicate(
        &self,
        type_of: &dyn Fn(&str) -> Option<DataType>,
    ) -> Result<String, String> {
        let mut parts = Vec::new();
        for column in &self.columns {
            let quoted = quote_identifier(column);
            let data_type = type_of(column);
            for (key, bound, op) in [("min", &self.min, ">="), ("max", &self.max, "<=")] {
                let Some(bound) = bound else { continue };
                if let Some(data_type) = &data_type {
                    range_bound_fits(data_type, bound).map_err(|why| {
                        format!(
                            "[[check]] `{}`: {key} = {bound} on column `{column}` ({data_type}): {why}",
                            self.name
                        )
                    })?;
                }
                parts.push(format!(
                    "{quoted} {op} {}",
                    typed_bound(bound, data_type.as_ref())
                ));
            }
            if data_type.as_ref().is_some_and(DataType::is_floating) {
                parts.push(format!("NOT isnan({quoted})"));
            }
        }
        Ok(parts.join(" AND "))
    }

    /// Whether the check's columns are of a kind it can judge: a `freshness` column must be
    /// a date, a timestamp or text holding them (an integer was cast as epoch seconds, so
    /// epoch milliseconds were always fresh, in the year 58000).
    pub fn check_types(&self, type_of: &dyn Fn(&str) -> Option<DataType>) -> Result<(), String> {
        if self.kind != CheckKind::Freshness {
            return Ok(());
        }
        for column in &self.columns {
            match type_of(column) {
                Some(
                    DataType::Date32
                    | DataType::Date64
                    | DataType::Timestamp(_, _)
                    | DataType::Utf8
                    | DataType::LargeUtf8
                    | DataType::Utf8View,
                )
                | None => {}
                Some(other) => {
                    return Err(format!(
                        "[[check]] `{}`: freshness needs a date or timestamp column, and `{column}` is {other} (an epoch number's unit is not known): convert it in the SQL, e.g. to_timestamp_millis(`{column}`)",
                        self.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// True for a check on the rows the job publishes (not on a source).
    pub fn on_result(&self) -> bool {
        self.on == RESULT
    }

    /// True for a check whose failing rows go to the rejects table.
    pub fn quarantines(&self) -> bool {
        self.on_fail == OnFail::Quarantine
    }

    /// The query over `result` whose rows are the failures, for checks on all the rows
    /// together (`unique`, `sql`, `freshness`, `relationship`); `None` for the others. A key
    /// with a NULL in it is never a duplicate (as in SQL's `UNIQUE`) nor a missing reference.
    pub fn set_query(&self) -> Option<String> {
        self.set_query_over(RESULT)
    }

    /// The query a check on a source runs over `table` (the source's registered name): the
    /// set query, or for a row-level check the rows its predicate is false on; for
    /// `row_count`, one row with the count in [`ROWS_COUNTED_COLUMN`].
    pub fn source_query(&self, table: &str) -> Option<String> {
        let from = quote_identifier(table);
        match (self.kind, self.row_predicate()) {
            (CheckKind::RowCount, _) => Some(format!(
                "SELECT COUNT(*) AS {ROWS_COUNTED_COLUMN} FROM {from}"
            )),
            (_, Some(predicate)) => Some(format!("SELECT * FROM {from} WHERE NOT ({predicate})")),
            (_, None) => self.set_query_over(&from),
        }
    }

    /// [`Self::source_query`] with the source's column types (see
    /// [`Self::typed_row_predicate`]).
    pub fn typed_source_query(
        &self,
        table: &str,
        type_of: &dyn Fn(&str) -> Option<DataType>,
    ) -> Result<Option<String>, String> {
        match (self.kind, self.typed_row_predicate(type_of)?) {
            (CheckKind::RowCount, _) | (_, None) => Ok(self.source_query(table)),
            (_, Some(predicate)) => Ok(Some(format!(
                "SELECT * FROM {} WHERE NOT ({predicate})",
                quote_identifier(table)
            ))),
        }
    }

    fn set_query_over(&self, table: &str) -> Option<String> {
        match self.kind {
            CheckKind::Unique => {
                let key: Vec<String> = self.columns.iter().map(|c| quote_identifier(c)).collect();
                let present = all_present(&key);
                let key = key.join(", ");
                Some(format!(
                    "SELECT {key}, COUNT(*) AS {DUPLICATE_ROWS_COLUMN} FROM {table} \
                     WHERE {present} GROUP BY {key} HAVING COUNT(*) > 1"
                ))
            }
            CheckKind::Sql => self.sql.clone(),
            CheckKind::Relationship => {
                let theirs = if self.to_columns.is_empty() {
                    &self.columns
                } else {
                    &self.to_columns
                };
                let ours: Vec<String> = self
                    .columns
                    .iter()
                    .map(|c| format!("r.{}", quote_identifier(c)))
                    .collect();
                let present = all_present(&ours);
                let matched = ours
                    .iter()
                    .zip(theirs)
                    .map(|(o, t)| format!("t.{} = {o}", quote_identifier(t)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let key = ours.join(", ");
                Some(format!(
                    "SELECT {key}, COUNT(*) AS {DUPLICATE_ROWS_COLUMN} FROM {table} r \
                     WHERE {present} AND NOT EXISTS (SELECT 1 FROM {RELATIONSHIP_VIEW} t WHERE {matched}) \
                     GROUP BY {key}"
                ))
            }
            CheckKind::Freshness => {
                let column = quote_identifier(self.columns.first()?);
                let interval = parse_age(self.max_age.as_deref()?)?;
                // Rows whose every value is NULL have no newest value: a column upstream
                // stopped filling is what the check is for (it passed, "not older").
                Some(format!(
                    "SELECT MAX({column}) AS newest FROM {table} \
                     HAVING COUNT(*) > 0 AND (MAX({column}) IS NULL \
                     OR CAST(MAX({column}) AS TIMESTAMP) < CAST(now() AS TIMESTAMP) - INTERVAL '{interval}')"
                ))
            }
            _ => None,
        }
    }

    /// `row_count`'s `max_change` as a percentage (`"30%"` is 30.0); `None` if unset or
    /// malformed.
    pub fn max_change_percent(&self) -> Option<f64> {
        let text = self.max_change.as_deref()?.trim();
        let percent: f64 = text.strip_suffix('%')?.trim().parse().ok()?;
        (percent.is_finite() && percent >= 0.0).then_some(percent)
    }

    /// `row_count`'s bounds.
    pub fn row_bounds(&self) -> (Option<u64>, Option<u64>) {
        let bound = |v: &Option<toml::Value>| v.as_ref().and_then(toml::Value::as_integer);
        (
            bound(&self.min).map(|n| n.max(0) as u64),
            bound(&self.max).map(|n| n.max(0) as u64),
        )
    }
}

/// A key `check` sets that its type does not read (`min` on a `unique` check, `pattern` on
/// a `range`), with the types that read it: the check would pass without it, and the
/// author meant something else.
fn key_it_ignores(check: &CheckSpec) -> Option<(&'static str, &'static [CheckKind])> {
    use CheckKind::*;
    let set: [(&str, bool, &[CheckKind]); 9] = [
        ("values", !check.values.is_empty(), &[AcceptedValues]),
        ("min", check.min.is_some(), &[Range, RowCount]),
        ("max", check.max.is_some(), &[Range, RowCount]),
        ("pattern", check.pattern.is_some(), &[Regex]),
        ("sql", check.sql.is_some(), &[Sql]),
        ("max_age", check.max_age.is_some(), &[Freshness]),
        ("to", check.to.is_some(), &[Relationship]),
        ("to_columns", !check.to_columns.is_empty(), &[Relationship]),
        ("max_change", check.max_change.is_some(), &[RowCount]),
    ];
    set.into_iter()
        .find(|(_, is_set, kinds)| *is_set && !kinds.contains(&check.kind))
        .map(|(key, _, kinds)| (key, kinds))
}

/// Whether bounds `min` and `max` are the wrong way round: both numbers with `min` the
/// larger, or both text of one shape (the same length, digits in the same places: two dates,
/// two timestamps written alike, two codes) with `min` after `max`. Text of different shapes
/// (`2024-01-01` and `2024-01-01 12:00`) is not judged here.
fn bounds_reversed(min: &toml::Value, max: &toml::Value) -> bool {
    use toml::Value;
    let number = |v: &Value| match v {
        Value::Integer(n) => Some(*n as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    };
    if let (Some(min), Some(max)) = (number(min), number(max)) {
        return min > max;
    }
    let (Value::String(min), Value::String(max)) = (min, max) else {
        return false;
    };
    let shape = |s: &str| s.bytes().map(|b| b.is_ascii_digit()).collect::<Vec<_>>();
    min.len() == max.len() && shape(min) == shape(max) && min > max
}

/// `90m`, `36h`, `2d` (or `s`) as a SQL interval (`36 hours`); `None` if malformed.
fn parse_age(text: &str) -> Option<String> {
    let text = text.trim();
    let unit_at = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(unit_at);
    let number: u64 = number.parse().ok()?;
    let unit = match unit.trim() {
        "s" => "seconds",
        "m" => "minutes",
        "h" => "hours",
        "d" => "days",
        _ => return None,
    };
    Some(format!("{number} {unit}"))
}

/// `a IS NOT NULL AND b IS NOT NULL ...` for the (quoted) `columns`.
fn all_present(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| format!("{c} IS NOT NULL"))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `"name"`, with `"` doubled: any column name, as written.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A TOML value as a SQL literal: numbers and booleans as they are, everything else a string
/// (which DataFusion coerces to a date or timestamp when compared with one).
fn literal(value: &toml::Value) -> String {
    match value {
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::String(s) => quote_string(s),
        other => quote_string(&other.to_string()),
    }
}

/// `bound` as SQL, in the column's type when that is a `real`: compared as a `double`, the
/// column's 0.3 (stored as 0.300000011920929) is above `max = 0.3`.
fn typed_bound(bound: &toml::Value, data_type: Option<&DataType>) -> String {
    let number = matches!(bound, toml::Value::Integer(_) | toml::Value::Float(_));
    match data_type {
        Some(DataType::Float16 | DataType::Float32) if number => {
            format!("CAST({} AS REAL)", literal(bound))
        }
        _ => literal(bound),
    }
}

/// Why `bound` cannot bound a column of `data_type` (`Ok`: it can, or the type is not one
/// this judges).
fn range_bound_fits(data_type: &DataType, bound: &toml::Value) -> Result<(), &'static str> {
    use toml::Value;
    let number = matches!(bound, Value::Integer(_) | Value::Float(_));
    let text = matches!(bound, Value::String(_));
    match data_type {
        t if t.is_numeric() && !number => Err(
            "a number column is bounded by a number: write it unquoted (quoted, 100 and 5 compared as text would pass \"10\"...\"50\")",
        ),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View if !text => Err(
            "a text column compares as text ('100' is below '50'): quote the bound to compare text, or CAST the column to a number in the SQL",
        ),
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _) if !text => {
            Err("a date or timestamp is bounded by a quoted date: max = \"2025-12-31\"")
        }
        _ => Ok(()),
    }
}

/// Every check well-formed: a unique name, on the result, the keys its type needs.
pub(crate) fn check_checks(
    checks: &[CheckSpec],
    sources: &[&str],
    path: &Path,
) -> Result<(), SpecError> {
    let mut names = std::collections::BTreeSet::new();
    for check in checks {
        let invalid = |message: String| {
            SpecError::invalid(path, format!("[[check]] `{}`: {message}", check.name))
        };
        if check.name.trim().is_empty() {
            return Err(SpecError::invalid(path, "[[check]] needs a name"));
        }
        if !names.insert(check.name.as_str()) {
            return Err(invalid("is defined twice".to_string()));
        }
        if check.on != RESULT && !sources.contains(&check.on.as_str()) {
            return Err(invalid(format!(
                "on = \"{}\" is neither \"result\" nor a [[source]] (sources: {})",
                check.on,
                if sources.is_empty() {
                    "none".to_string()
                } else {
                    sources.join(", ")
                }
            )));
        }
        if check.on != RESULT && check.max_change.is_some() {
            return Err(invalid(
                "max_change compares the result with the previous run; on a source give min and/or max"
                    .to_string(),
            ));
        }
        let takes_columns = !matches!(check.kind, CheckKind::RowCount | CheckKind::Sql);
        if takes_columns && check.columns.is_empty() {
            return Err(invalid(format!(
                "type = \"{}\" needs columns = [\"column\", ...]",
                check.kind.name()
            )));
        }
        if !takes_columns && !check.columns.is_empty() {
            return Err(invalid(format!(
                "type = \"{}\" takes no columns{}",
                check.kind.name(),
                if check.kind == CheckKind::Sql {
                    " (name them in its query)"
                } else {
                    ""
                }
            )));
        }
        if check.quarantines() && (check.on != RESULT || check.row_predicate().is_none()) {
            return Err(invalid(format!(
                "on_fail = \"quarantine\" sets rows aside one by one: it applies to not_null, \
                 accepted_values, range and regex checks on the result, not to {}",
                if check.on != RESULT {
                    format!("a check on source `{}`", check.on)
                } else {
                    format!("type = \"{}\"", check.kind.name())
                }
            )));
        }
        if let Some((key, kinds)) = key_it_ignores(check) {
            return Err(invalid(format!(
                "{key} = ... belongs to type = {}, not type = \"{}\" (which would ignore it)",
                kinds
                    .iter()
                    .map(|k| format!("\"{}\"", k.name()))
                    .collect::<Vec<_>>()
                    .join(" or "),
                check.kind.name()
            )));
        }
        if let (Some(min), Some(max)) = (&check.min, &check.max)
            && bounds_reversed(min, max)
        {
            return Err(invalid(format!(
                "min = {min} is above max = {max}: no value could pass"
            )));
        }
        if check.kind == CheckKind::Regex
            && let Some(pattern) = &check.pattern
            && let Err(e) = regex::Regex::new(pattern)
        {
            return Err(invalid(format!(
                "pattern {pattern:?} is not a regular expression: {e}"
            )));
        }
        if check.kind == CheckKind::RowCount
            && let Some((key, bound)) = [("min", &check.min), ("max", &check.max)]
                .into_iter()
                .find_map(|(key, b)| {
                    b.as_ref()
                        .filter(|b| b.as_integer().is_none_or(|n| n < 0))
                        .map(|b| (key, b))
                })
        {
            return Err(invalid(format!(
                "type = \"row_count\": {key} = {bound} is not a whole number of rows (write {key} = 1000, unquoted)"
            )));
        }
        let needs = match check.kind {
            CheckKind::AcceptedValues if check.values.is_empty() => Some("values = [...]"),
            CheckKind::Range if check.min.is_none() && check.max.is_none() => {
                Some("min = ... and/or max = ...")
            }
            CheckKind::Regex if check.pattern.is_none() => Some("pattern = \"...\""),
            CheckKind::Sql if check.sql.as_deref().is_none_or(|q| q.trim().is_empty()) => {
                Some("sql = \"SELECT ... FROM result WHERE <the rows that break the rule>\"")
            }
            CheckKind::Relationship if check.to.is_none() => {
                Some("to = \"namespace.table\" (the table whose rows the keys must match)")
            }
            CheckKind::Relationship
                if !check.to_columns.is_empty()
                    && check.to_columns.len() != check.columns.len() =>
            {
                Some("as many to_columns as columns (they are matched in order)")
            }
            CheckKind::Freshness if check.columns.len() != 1 => {
                Some("exactly one column (a date or timestamp): columns = [\"loaded_at\"]")
            }
            CheckKind::Freshness if check.max_age.as_deref().and_then(parse_age).is_none() => {
                Some("max_age = \"<number><s|m|h|d>\", e.g. \"36h\"")
            }
            CheckKind::RowCount
                if check.max_change.is_some() && check.max_change_percent().is_none() =>
            {
                Some("max_change = \"<percent>%\", e.g. \"30%\"")
            }
            CheckKind::RowCount
                if check.row_bounds() == (None, None) && check.max_change.is_none() =>
            {
                Some(
                    "min = N and/or max = N (whole numbers), or max_change = \"30%\" (against the previous run)",
                )
            }
            _ => None,
        };
        if let Some(needs) = needs {
            return Err(invalid(format!(
                "type = \"{}\" needs {needs}",
                check.kind.name()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml_text: &str) -> CheckSpec {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn range_bounds_fit_their_columns_and_nan_fails_a_range() {
        use arrow_schema::TimeUnit;
        let types = |column: &str| match column {
            "n" => Some(DataType::Int64),
            "r" => Some(DataType::Float64),
            "f" => Some(DataType::Float32),
            "s" => Some(DataType::Utf8),
            "d" => Some(DataType::Date32),
            "t" => Some(DataType::Timestamp(TimeUnit::Microsecond, None)),
            "e" => Some(DataType::Int64),
            _ => None,
        };
        let range = |column: &str, bounds: &str| {
            check(&format!(
                "name = \"a\"\ntype = \"range\"\ncolumns = [\"{column}\"]\n{bounds}"
            ))
            .typed_row_predicate(&types)
        };
        for (column, bounds, says) in [
            (
                "n",
                "min = \"10\"\nmax = 50",
                "min = \"10\" on column `n` (Int64): a number column",
            ),
            ("r", "max = \"1.5\"", "max = \"1.5\" on column `r`"),
            ("s", "max = 50", "a text column compares as text"),
            ("d", "max = 20251231", "bounded by a quoted date"),
            ("t", "min = 0", "bounded by a quoted date"),
        ] {
            let err = range(column, bounds).unwrap_err();
            assert!(
                err.contains("[[check]] `a`: ") && err.contains(says),
                "{err}"
            );
        }
        assert_eq!(
            range("n", "min = 10\nmax = 50").unwrap().as_deref(),
            Some("\"n\" >= 10 AND \"n\" <= 50")
        );
        assert_eq!(
            range("r", "max = 1").unwrap().as_deref(),
            Some("\"r\" <= 1 AND NOT isnan(\"r\")")
        );
        // A `real` compares with its bound in its own precision.
        assert_eq!(
            range("f", "max = 0.3").unwrap().as_deref(),
            Some("\"f\" <= CAST(0.3 AS REAL) AND NOT isnan(\"f\")")
        );
        assert!(range("s", "min = \"A\"\nmax = \"M\"").is_ok());
        assert!(range("d", "min = \"2024-01-01\"").is_ok());
        // A column whose type is not known is left to the query's planning.
        assert!(range("unknown", "min = \"10\"").is_ok());
        // Freshness needs a date or a timestamp: an integer's epoch unit is not known.
        let fresh = |column: &str| {
            check(&format!(
                "name = \"f\"\ntype = \"freshness\"\ncolumns = [\"{column}\"]\nmax_age = \"2h\""
            ))
            .check_types(&types)
        };
        assert!(fresh("e").unwrap_err().contains("to_timestamp_millis(`e`)"));
        for column in ["t", "d", "s", "unknown"] {
            assert!(fresh(column).is_ok(), "{column}");
        }
        let on_source = check(
            "name = \"f\"\non = \"src\"\ntype = \"freshness\"\ncolumns = [\"e\"]\nmax_age = \"2h\"",
        );
        assert!(on_source.typed_source_query("src", &types).is_err());
    }

    #[test]
    fn bounds_are_reversed_when_min_is_past_max_of_the_same_kind() {
        use toml::Value;
        let text = |s: &str| Value::String(s.to_string());
        for (min, max, reversed) in [
            (Value::Integer(10), Value::Integer(5), true),
            (Value::Integer(5), Value::Integer(5), false),
            (Value::Float(0.5), Value::Integer(1), false),
            (Value::Integer(2), Value::Float(1.5), true),
            (text("2025-12-31"), text("2025-01-01"), true),
            (text("2025-01-01"), text("2025-12-31"), false),
            (text("M"), text("A"), true),
            // Other shapes, other kinds: not judged.
            (text("2025-01-02"), text("2025-01-01 12:00"), false),
            (text("9"), text("10"), false),
            (Value::Integer(10), text("5"), false),
        ] {
            assert_eq!(bounds_reversed(&min, &max), reversed, "{min} {max}");
        }
    }

    #[test]
    fn row_count_takes_a_relative_bound() {
        let relative = check("name = \"r\"\ntype = \"row_count\"\nmax_change = \"30%\"");
        assert_eq!(relative.max_change_percent(), Some(30.0));
        assert!(check_checks(&[relative], &[], Path::new("p.toml")).is_ok());
        for (text, says) in [
            ("type = \"row_count\"\nmax_change = \"30\"", "e.g. \"30%\""),
            ("type = \"row_count\"\nmax_change = \"-5%\"", "e.g. \"30%\""),
            ("type = \"row_count\"", "or max_change"),
            (
                "type = \"not_null\"\ncolumns = [\"a\"]\nmax_change = \"5%\"",
                "belongs to type = \"row_count\"",
            ),
        ] {
            let err = check_checks(
                &[check(&format!("name = \"r\"\n{text}"))],
                &[],
                Path::new("p.toml"),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn row_checks_become_predicates() {
        let cases = [
            (
                "name = \"a\"\ntype = \"not_null\"\ncolumns = [\"id\", \"odd \\\"name\\\"\"]",
                "\"id\" IS NOT NULL AND \"odd \"\"name\"\"\" IS NOT NULL",
            ),
            (
                "name = \"a\"\ntype = \"accepted_values\"\ncolumns = [\"s\"]\nvalues = [\"x\", \"it's\", 3]",
                "\"s\" IN ('x', 'it''s', 3)",
            ),
            (
                "name = \"a\"\ntype = \"range\"\ncolumns = [\"n\"]\nmin = 0\nmax = 1.5",
                "\"n\" >= 0 AND \"n\" <= 1.5",
            ),
            (
                "name = \"a\"\ntype = \"range\"\ncolumns = [\"d\"]\nmin = \"2024-01-01\"",
                "\"d\" >= '2024-01-01'",
            ),
            (
                "name = \"a\"\ntype = \"regex\"\ncolumns = [\"e\"]\npattern = \"^[a-z]+@\"",
                "regexp_like(CAST(\"e\" AS VARCHAR), '^[a-z]+@')",
            ),
        ];
        for (text, predicate) in cases {
            assert_eq!(
                check(text).row_predicate().as_deref(),
                Some(predicate),
                "{text}"
            );
        }
        let unique = check("name = \"u\"\ntype = \"unique\"\ncolumns = [\"a\", \"b c\"]");
        assert_eq!(unique.row_predicate(), None);
        assert_eq!(
            unique.set_query().as_deref(),
            Some(
                "SELECT \"a\", \"b c\", COUNT(*) AS rows_with_this_key FROM result \
                 WHERE \"a\" IS NOT NULL AND \"b c\" IS NOT NULL GROUP BY \"a\", \"b c\" \
                 HAVING COUNT(*) > 1"
            )
        );
        let sql = check("name = \"s\"\ntype = \"sql\"\nsql = \"SELECT * FROM result WHERE a > b\"");
        assert_eq!(sql.row_predicate(), None);
        assert_eq!(
            sql.set_query().as_deref(),
            Some("SELECT * FROM result WHERE a > b")
        );
        let fresh =
            check("name = \"f\"\ntype = \"freshness\"\ncolumns = [\"at\"]\nmax_age = \"36h\"");
        assert_eq!(
            fresh.set_query().as_deref(),
            Some(
                "SELECT MAX(\"at\") AS newest FROM result \
                 HAVING COUNT(*) > 0 AND (MAX(\"at\") IS NULL \
                 OR CAST(MAX(\"at\") AS TIMESTAMP) < CAST(now() AS TIMESTAMP) - INTERVAL '36 hours')"
            )
        );
        let related = check(
            "name = \"r\"\ntype = \"relationship\"\ncolumns = [\"cust\"]\nto = \"a.customers\"\nto_columns = [\"id\"]",
        );
        assert_eq!(
            related.set_query().as_deref(),
            Some(
                "SELECT r.\"cust\", COUNT(*) AS rows_with_this_key FROM result r \
                 WHERE r.\"cust\" IS NOT NULL AND NOT EXISTS \
                 (SELECT 1 FROM __nightshift_relationship t WHERE t.\"id\" = r.\"cust\") GROUP BY r.\"cust\""
            )
        );
        assert_eq!(parse_age(" 90m "), Some("90 minutes".into()));
        assert_eq!(parse_age("2d"), Some("2 days".into()));
        for bad in ["", "h", "12", "1.5h", "-1d", "3w"] {
            assert_eq!(parse_age(bad), None, "{bad}");
        }
        let rows = check("name = \"r\"\ntype = \"row_count\"\nmin = 10");
        assert_eq!(rows.row_predicate(), None);
        assert_eq!(rows.row_bounds(), (Some(10), None));
        assert_eq!(rows.severity, Severity::Error);
        assert_eq!(rows.on, "result");
    }

    #[test]
    fn malformed_checks_are_refused_by_name() {
        let path = Path::new("p.toml");
        for (text, message) in [
            (
                "name = \"a\"\ntype = \"range\"\ncolumns = [\"n\"]",
                "`a`: type = \"range\" needs min",
            ),
            (
                "name = \"a\"\ntype = \"not_null\"",
                "`a`: type = \"not_null\" needs columns",
            ),
            (
                "name = \"a\"\ntype = \"relationship\"\ncolumns = [\"n\"]",
                "`a`: type = \"relationship\" needs to = ",
            ),
            (
                "name = \"a\"\ntype = \"relationship\"\ncolumns = [\"n\"]\nto = \"a.b\"\nto_columns = [\"x\", \"y\"]",
                "needs as many to_columns as columns",
            ),
            (
                "name = \"a\"\ntype = \"freshness\"\ncolumns = [\"n\"]\nmax_age = \"3 weeks\"",
                "needs max_age = \"<number><s|m|h|d>\"",
            ),
            (
                "name = \"a\"\ntype = \"freshness\"\ncolumns = [\"n\", \"m\"]\nmax_age = \"3d\"",
                "needs exactly one column",
            ),
            (
                "name = \"a\"\ntype = \"unique\"",
                "`a`: type = \"unique\" needs columns",
            ),
            (
                "name = \"a\"\ntype = \"sql\"",
                "`a`: type = \"sql\" needs sql =",
            ),
            (
                "name = \"a\"\ntype = \"sql\"\ncolumns = [\"n\"]\nsql = \"SELECT 1\"",
                "takes no columns (name them in its query)",
            ),
            (
                "name = \"a\"\ntype = \"not_null\"\ncolumns = [\"n\"]\nsql = \"SELECT 1\"",
                "sql = ... belongs to type = \"sql\"",
            ),
            (
                "name = \"a\"\ntype = \"unique\"\ncolumns = [\"n\"]\nmin = 0",
                "min = ... belongs to type = \"range\" or \"row_count\", not type = \"unique\"",
            ),
            (
                "name = \"a\"\ntype = \"range\"\ncolumns = [\"n\"]\nmin = 0\npattern = \"x\"",
                "pattern = ... belongs to type = \"regex\"",
            ),
            (
                "name = \"a\"\ntype = \"not_null\"\ncolumns = [\"n\"]\nmax_age = \"1d\"",
                "max_age = ... belongs to type = \"freshness\"",
            ),
            (
                "name = \"a\"\ntype = \"range\"\ncolumns = [\"n\"]\nmin = 10\nmax = 5.5",
                "min = 10 is above max = 5.5: no value could pass",
            ),
            (
                "name = \"a\"\ntype = \"range\"\ncolumns = [\"d\"]\nmin = \"2025-12-31\"\nmax = \"2025-01-01\"",
                "min = \"2025-12-31\" is above max = \"2025-01-01\"",
            ),
            (
                "name = \"a\"\ntype = \"row_count\"\nmin = 100\nmax = 10",
                "min = 100 is above max = 10",
            ),
            (
                "name = \"a\"\non = \"ordres\"\ntype = \"not_null\"\ncolumns = [\"n\"]",
                "is neither \"result\" nor a [[source]] (sources: orders)",
            ),
            (
                "name = \"a\"\non = \"orders\"\ntype = \"row_count\"\nmax_change = \"5%\"",
                "on a source give min and/or max",
            ),
            (
                "name = \"a\"\ntype = \"row_count\"\ncolumns = [\"n\"]\nmin = 1",
                "takes no columns",
            ),
            (
                "name = \"a\"\ntype = \"regex\"\ncolumns = [\"n\"]\npattern = \"([a-z\"",
                "`a`: pattern \"([a-z\" is not a regular expression",
            ),
            (
                "name = \"a\"\ntype = \"row_count\"\nmin = \"1000\"\nmax = 5000",
                "min = \"1000\" is not a whole number of rows",
            ),
            (
                "name = \"a\"\ntype = \"row_count\"\nmin = 1\nmax = 20.0",
                "max = 20.0 is not a whole number of rows",
            ),
            (
                "name = \"a\"\ntype = \"accepted_values\"\ncolumns = [\"n\"]",
                "needs values",
            ),
            (
                "name = \"a\"\ntype = \"unique\"\ncolumns = [\"n\"]\non_fail = \"quarantine\"",
                "not to type = \"unique\"",
            ),
            (
                "name = \"a\"\non = \"orders\"\ntype = \"not_null\"\ncolumns = [\"n\"]\non_fail = \"quarantine\"",
                "not to a check on source `orders`",
            ),
        ] {
            let err = check_checks(&[check(text)], &["orders"], path)
                .unwrap_err()
                .to_string();
            assert!(err.contains(message), "{text}: {err}");
        }
        let twice = vec![check("name = \"a\"\ntype = \"row_count\"\nmin = 1"); 2];
        assert!(
            check_checks(&twice, &[], path)
                .unwrap_err()
                .to_string()
                .contains("defined twice")
        );
    }
}
