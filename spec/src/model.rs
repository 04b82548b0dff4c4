//! The TOML model of a pipeline spec, its parsing and its consistency checks.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::SpecError;
use crate::params::substitute_within;
use crate::suggest;

/// A whole pipeline spec file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// `[pipeline]`: who and what.
    pub pipeline: PipelineSection,
    /// `[params]`: parameter defaults, overridden with `--param k=v`, used as `${k}`.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// `[[source]]`: tables the SQL reads.
    #[serde(default)]
    pub source: Vec<SourceSpec>,
    /// `[transform]`: the SQL producing the target rows.
    pub transform: TransformSpec,
    /// `[target]`: the Iceberg table the result is published to.
    pub target: TargetSpec,
    /// `[execution]`: optional tuning.
    #[serde(default)]
    pub execution: ExecutionSection,
    /// `[[check]]`: rules the published rows must satisfy.
    #[serde(default)]
    pub check: Vec<crate::check::CheckSpec>,
    /// `[maintenance]`: the target's upkeep, run by `nightshift maintain --spec`.
    #[serde(default)]
    pub maintenance: crate::maintenance::MaintenanceSection,
}

/// `[pipeline]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Pipeline name; recorded in every snapshot it commits.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    /// Names the pipeline had before a rename: what an incremental source consumed under
    /// them is its own (without, a renamed pipeline's next run is refused rather than read
    /// its sources whole again).
    #[serde(default)]
    pub previous_names: Vec<String>,
}

impl PipelineSection {
    /// Its name, then the names it had before.
    pub fn names(&self) -> Vec<&str> {
        std::iter::once(self.name.as_str())
            .chain(self.previous_names.iter().map(String::as_str))
            .collect()
    }
}

/// Source file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Parquet,
    Csv,
    Json,
    Iceberg,
}

impl std::fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceFormat::Parquet => "parquet",
            SourceFormat::Csv => "csv",
            SourceFormat::Json => "json",
            SourceFormat::Iceberg => "iceberg",
        })
    }
}

/// `[[source]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Table name the SQL uses.
    pub name: String,
    pub format: SourceFormat,
    /// File, directory, glob, `file://` or `s3://` URL. Not used for `iceberg`.
    #[serde(default)]
    pub location: Option<String>,
    /// For `format = "iceberg"`: `namespace.table` in the pipeline's catalog.
    #[serde(default)]
    pub table: Option<String>,
    /// Reader options, e.g. csv `header`, `delimiter`, `quote`, `null_value`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Schema contract: `column = "bigint not null"`. CSV and JSON are read with it.
    #[serde(default)]
    pub schema: BTreeMap<String, String>,
    /// For `format = "iceberg"`: read only the snapshots appended since this pipeline's last
    /// committed run (recorded in the target's snapshot summary by that run's commit).
    #[serde(default)]
    pub incremental: bool,
    /// For an incremental source: what to do when the source was rewritten (overwrite,
    /// delete, compaction, rollback) since the last run.
    #[serde(default)]
    pub on_source_rewrite: OnSourceRewrite,
}

/// What an incremental source does when the snapshots since the last run are not all appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSourceRewrite {
    /// The job fails and says which snapshot rewrote the source (the default).
    #[default]
    Fail,
    /// The job reads the whole current table (suits a target in overwrite mode).
    Full,
}

/// `[transform]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    #[serde(default)]
    pub sql: Option<String>,
    /// Path to a `.sql` file, relative to the spec.
    #[serde(default)]
    pub sql_file: Option<String>,
}

/// How the result is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// Add the result as new data files (the default).
    #[default]
    Append,
    /// Replace the table content with the result.
    Overwrite,
    /// Replace exactly the partitions the result has rows in; other partitions are untouched
    /// (dynamic partition overwrite: rerun a day, backfill a month).
    #[serde(rename = "overwrite_partitions")]
    OverwritePartitions,
    /// Rows of the result replace the table's rows with the same `merge_keys`; the others
    /// are inserted (copy-on-write upsert).
    Merge,
    /// Rewrite the table's small data files into files near the target size, rows
    /// unchanged (a `replace` snapshot): what `nightshift maintain --compact --cluster`
    /// submits, so the rewrite runs as tasks on the workers. The one source is the table
    /// itself, the SQL `SELECT * FROM <source>`, and `[maintenance]` gives the policy.
    Compact,
}

impl std::fmt::Display for WriteMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriteMode::Append => "append",
            WriteMode::Overwrite => "overwrite",
            WriteMode::OverwritePartitions => "overwrite_partitions",
            WriteMode::Merge => "merge",
            WriteMode::Compact => "compact",
        })
    }
}

/// `[target]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// `namespace.table`.
    pub table: String,
    #[serde(default)]
    pub mode: WriteMode,
    /// Iceberg partition transforms: `day(ts)`, `identity(region)`, `bucket(16, id)`, ...
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// Table properties set when the table is created.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// `mode = "merge"`: the columns that identify a row.
    #[serde(default)]
    pub merge_keys: Vec<String>,
    /// `mode = "merge"`: a SQL predicate over the result's columns; matching rows delete the
    /// table's row with their key instead of replacing it.
    #[serde(default)]
    pub delete_when: Option<String>,
    /// What a run may change in an existing table's schema.
    #[serde(default)]
    pub schema_evolution: SchemaEvolution,
}

/// `[target] schema_evolution`: how far the result may differ from an existing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaEvolution {
    /// The result has the table's columns (a narrower type that converts without loss, such
    /// as int into a long column, is written converted). Anything else fails the job.
    #[default]
    None,
    /// Also: result columns the table lacks are added as nullable columns, and a column may
    /// widen as Iceberg allows (int to long, float to double, a decimal's precision), in the
    /// same commit as the run's rows.
    AddColumns,
}

impl std::fmt::Display for SchemaEvolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SchemaEvolution::None => "none",
            SchemaEvolution::AddColumns => "add_columns",
        })
    }
}

/// `[execution]`: tuning with sane defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionSection {
    /// Input bytes per scan task (default 64 MiB).
    #[serde(default)]
    pub target_task_bytes: Option<u64>,
    /// Partitions of each shuffle, tasks per stage (default: input bytes ÷
    /// `target_task_bytes`, at most 256).
    #[serde(default)]
    pub shuffle_partitions: Option<usize>,
    /// Attempts per task before the job fails (default 3).
    #[serde(default)]
    pub max_task_attempts: Option<u32>,
    /// A join side smaller than this is broadcast instead of shuffled (Ballista's
    /// `broadcast_join_threshold_bytes`; 0 always shuffles both sides). By default an eighth
    /// of the memory the broadcast table may count on, between 32 and 512 MiB.
    #[serde(default)]
    pub broadcast_join_threshold_bytes: Option<u64>,
}

/// Keys allowed in each table, for "did you mean" hints.
const SECTION_KEYS: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "pipeline",
            "params",
            "source",
            "transform",
            "target",
            "execution",
            "check",
            "maintenance",
        ],
    ),
    (
        "pipeline",
        &["name", "description", "owner", "previous_names"],
    ),
    (
        "source",
        &[
            "name",
            "format",
            "location",
            "table",
            "options",
            "schema",
            "incremental",
            "on_source_rewrite",
        ],
    ),
    ("transform", &["sql", "sql_file"]),
    (
        "check",
        &[
            "name",
            "on",
            "type",
            "columns",
            "values",
            "min",
            "max",
            "pattern",
            "sql",
            "max_age",
            "to",
            "to_columns",
            "max_change",
            "severity",
            "on_fail",
        ],
    ),
    (
        "target",
        &[
            "table",
            "mode",
            "partition_by",
            "properties",
            "merge_keys",
            "delete_when",
            "schema_evolution",
        ],
    ),
    (
        "execution",
        &[
            "target_task_bytes",
            "shuffle_partitions",
            "max_task_attempts",
            "broadcast_join_threshold_bytes",
        ],
    ),
    (
        "maintenance",
        &[
            "drop_partitions_older_than",
            "compact",
            "target_file_size_bytes",
            "min_input_files",
            "expire_older_than",
            "keep_last",
            "remove_orphans_older_than",
        ],
    ),
];

pub(crate) fn parse(text: &str, path: &Path) -> Result<Spec, SpecError> {
    toml::from_str::<Spec>(text).map_err(|e| SpecError::Parse {
        path: path.to_path_buf(),
        message: describe_toml_error(&e, text),
    })
}

/// Turns a toml/serde error into one line naming the key and the line, with a hint.
fn describe_toml_error(err: &toml::de::Error, text: &str) -> String {
    let message = err.message().trim().to_string();
    let line = err
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
    let hint = unknown_field_hint(&message).unwrap_or_default();
    format!("{at}{message}{hint}")
}

/// For "unknown field `x`, expected one of ..." finds the closest allowed key.
fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let field = &rest[..rest.find('`')?];
    let all = SECTION_KEYS
        .iter()
        .flat_map(|(_, keys)| keys.iter().copied());
    let hint = suggest::hint(field, all);
    (!hint.is_empty()).then_some(hint)
}

/// Substitutes `${param}` in every location and table name.
pub(crate) fn substitute(
    mut spec: Spec,
    params: &BTreeMap<String, String>,
    budget: &mut usize,
) -> Result<Spec, SpecError> {
    let mut substitute_params = |text: &str, params: &BTreeMap<String, String>, context: &str| {
        substitute_within(text, params, context, budget)
    };
    for source in &mut spec.source {
        let ctx = format!("source `{}`", source.name);
        if let Some(loc) = &source.location {
            source.location = Some(substitute_params(loc, params, &ctx)?);
        }
        if let Some(table) = &source.table {
            source.table = Some(substitute_params(table, params, &ctx)?);
        }
        for value in source.options.values_mut() {
            *value = substitute_params(value, params, &ctx)?;
        }
    }
    spec.target.table = substitute_params(&spec.target.table, params, "[target] table")?;
    if let Some(predicate) = &spec.target.delete_when {
        spec.target.delete_when = Some(substitute_params(
            predicate,
            params,
            "[target] delete_when",
        )?);
    }
    // A check's query and its reference table as the SQL is: `${param}` in them was left as
    // text, so a check comparing with '${run_date}' passed on every row.
    for check in &mut spec.check {
        let ctx = format!("[[check]] `{}`", check.name);
        if let Some(sql) = &check.sql {
            check.sql = Some(substitute_params(sql, params, &ctx)?);
        }
        if let Some(to) = &check.to {
            check.to = Some(substitute_params(to, params, &ctx)?);
        }
    }
    Ok(spec)
}

/// The most tasks a stage may have (`[execution] shuffle_partitions`): each is a task
/// message and a lease, and the planner sizes structures by the count (4294967296 made it
/// allocate a terabyte and abort).
pub const MAX_SHUFFLE_PARTITIONS: usize = 100_000;

/// Checks that do not need to touch any file: names, required keys per format.
pub(crate) fn check(spec: &Spec, path: &Path) -> Result<(), SpecError> {
    if spec.pipeline.name.trim().is_empty() {
        return Err(SpecError::invalid(path, "[pipeline] name is empty"));
    }
    if spec.pipeline.name.chars().any(char::is_control) {
        return Err(SpecError::invalid(
            path,
            "[pipeline] name holds a control character (a line break, a tab): it is one line of text in logs and snapshot summaries",
        ));
    }
    if let Some(bad) = spec
        .pipeline
        .previous_names
        .iter()
        .find(|n| n.trim().is_empty() || n.chars().any(char::is_control))
    {
        return Err(SpecError::invalid(
            path,
            format!(
                "[pipeline] previous_names holds {bad:?}: each is a name the pipeline had, one line of text"
            ),
        ));
    }
    if let Some(partitions) = spec.execution.shuffle_partitions
        && partitions > MAX_SHUFFLE_PARTITIONS
    {
        return Err(SpecError::invalid(
            path,
            format!(
                "[execution] shuffle_partitions = {partitions} is more than the {MAX_SHUFFLE_PARTITIONS} tasks a stage may have"
            ),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for source in &spec.source {
        if !is_identifier(&source.name) {
            return Err(SpecError::invalid(
                path,
                format!(
                    "source name `{}` is not a SQL identifier (letters, digits, _)",
                    source.name
                ),
            ));
        }
        if !seen.insert(source.name.to_lowercase()) {
            return Err(SpecError::invalid(
                path,
                format!("source `{}` is defined twice", source.name),
            ));
        }
        match (source.format, &source.location, &source.table) {
            (SourceFormat::Iceberg, _, None) => {
                return Err(SpecError::invalid(
                    path,
                    format!(
                        "source `{}`: format = \"iceberg\" needs table = \"namespace.table\"",
                        source.name
                    ),
                ));
            }
            (SourceFormat::Iceberg, _, Some(_)) => {}
            _ if source.incremental => {
                return Err(SpecError::invalid(
                    path,
                    format!(
                        "source `{}`: incremental = true needs format = \"iceberg\" (only an Iceberg table's snapshots say what is new)",
                        source.name
                    ),
                ));
            }
            (_, None, _) => {
                return Err(SpecError::invalid(
                    path,
                    format!(
                        "source `{}`: format = \"{}\" needs location = \"path, glob or URL\"",
                        source.name, source.format
                    ),
                ));
            }
            _ => {}
        }
    }
    if let Some(source) = spec
        .source
        .iter()
        .find(|s| !s.incremental && s.on_source_rewrite != OnSourceRewrite::default())
    {
        return Err(SpecError::invalid(
            path,
            format!(
                "source `{}`: on_source_rewrite applies to incremental = true sources only",
                source.name
            ),
        ));
    }
    if spec.target.mode == WriteMode::OverwritePartitions && spec.target.partition_by.is_empty() {
        return Err(SpecError::invalid(
            path,
            "[target] mode = \"overwrite_partitions\" replaces the partitions the result has rows in, and without partition_by the table is one partition: every run would replace the whole table; add partition_by = [\"day(ts)\"], or say mode = \"overwrite\"",
        ));
    }
    if let Some(source) = spec.source.iter().find(|s| s.incremental)
        && spec.target.mode == WriteMode::Overwrite
    {
        return Err(SpecError::invalid(
            path,
            format!(
                "source `{}`: incremental = true reads only the rows new since the last run, and \
                 mode = \"overwrite\" would replace the table with those rows alone; use \
                 mode = \"append\" or \"merge\", or read the source whole",
                source.name
            ),
        ));
    }
    if let Some(source) = spec.source.iter().find(|s| s.incremental)
        && spec.target.mode == WriteMode::OverwritePartitions
    {
        return Err(SpecError::invalid(
            path,
            format!(
                "source `{}`: incremental = true reads only the rows new since the last run, and \
                 mode = \"overwrite_partitions\" would replace each partition they touch with those \
                 rows alone (a late row would empty its day); use mode = \"merge\" with a key, or \
                 \"append\", or read the source whole",
                source.name
            ),
        ));
    }
    check_merge(&spec.target, path)?;
    check_compact(spec, path)?;
    let sources: Vec<&str> = spec.source.iter().map(|s| s.name.as_str()).collect();
    crate::check::check_checks(&spec.check, &sources, path)?;
    crate::maintenance::check_maintenance(&spec.maintenance, path)?;
    if let Some(check) = spec.check.iter().find(|c| c.quarantines())
        && spec.target.mode == WriteMode::Merge
    {
        return Err(SpecError::invalid(
            path,
            format!(
                "[[check]] `{}`: on_fail = \"quarantine\" does not apply to mode = \"merge\": a merge \
                 writes back rows already in the table, which a quarantine would remove",
                check.name
            ),
        ));
    }
    let parts: Vec<&str> = spec.target.table.split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| !is_identifier(p)) {
        return Err(SpecError::invalid(
            path,
            format!(
                "[target] table `{}` must be `namespace.table` (letters, digits, _)",
                spec.target.table
            ),
        ));
    }
    Ok(())
}

/// `mode = "compact"` rewrites the target's own files and nothing else: one Iceberg source
/// that is the target, all its columns selected unchanged, no checks, a `[maintenance]`
/// section with `compact = true`.
fn check_compact(spec: &Spec, path: &Path) -> Result<(), SpecError> {
    if spec.target.mode != WriteMode::Compact {
        return Ok(());
    }
    let refuse = |why: String| {
        Err(SpecError::invalid(
            path,
            format!("[target] mode = \"compact\" {why}"),
        ))
    };
    let [source] = spec.source.as_slice() else {
        return refuse(format!(
            "reads one source, the target table itself (this spec has {})",
            spec.source.len()
        ));
    };
    if source.format != SourceFormat::Iceberg
        || source.table.as_deref() != Some(spec.target.table.as_str())
        || source.incremental
    {
        return refuse(format!(
            "reads the target itself: its source must be format = \"iceberg\", table = \"{}\", not incremental",
            spec.target.table
        ));
    }
    let wanted = format!("select * from {}", source.name.to_lowercase());
    let sql = spec.transform.sql.as_deref().unwrap_or_default();
    if sql
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
        != wanted
    {
        return refuse(format!(
            "keeps every row as it is: its sql must be `SELECT * FROM {}`",
            source.name
        ));
    }
    if !spec.check.is_empty() {
        return refuse(
            "does not check rows (it changes files, not rows): remove the [[check]]s".into(),
        );
    }
    if !spec.maintenance.compact {
        return refuse("needs [maintenance] compact = true (and may set target_file_size_bytes, min_input_files)".into());
    }
    Ok(())
}

/// `merge_keys` and `delete_when` belong to `mode = "merge"`, which needs keys.
fn check_merge(target: &TargetSpec, path: &Path) -> Result<(), SpecError> {
    let merging = target.mode == WriteMode::Merge;
    if merging && target.merge_keys.is_empty() {
        return Err(SpecError::invalid(
            path,
            "[target] mode = \"merge\" needs merge_keys = [\"column\", ...]: the columns that identify a row",
        ));
    }
    if !merging && (!target.merge_keys.is_empty() || target.delete_when.is_some()) {
        return Err(SpecError::invalid(
            path,
            format!(
                "[target] merge_keys and delete_when only apply to mode = \"merge\" (this target's mode is \"{}\")",
                target.mode
            ),
        ));
    }
    if let Some(key) = target.merge_keys.iter().find(|k| !is_identifier(k)) {
        return Err(SpecError::invalid(
            path,
            format!("[target] merge key `{key}` is not a column name (letters, digits, _)"),
        ));
    }
    Ok(())
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .enumerate()
            .all(|(i, c)| identifier_char(c, i == 0))
}

/// Whether `c` may stand in an identifier (`[A-Za-z_][A-Za-z0-9_]*`, also Avro's names) at
/// the first place (`first`) or a later one.
pub(crate) fn identifier_char(c: char, first: bool) -> bool {
    c == '_' || c.is_ascii_alphabetic() || (!first && c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("p.toml")).unwrap_err().to_string()
    }

    const MINIMAL: &str = r#"
[pipeline]
name = "p"
[transform]
sql = "select 1"
[target]
table = "ns.t"
"#;

    #[test]
    fn minimal_spec_parses() {
        let spec = parse(MINIMAL, Path::new("p.toml")).unwrap();
        assert_eq!(spec.target.mode, WriteMode::Append);
        assert!(spec.source.is_empty());
    }

    #[test]
    fn unknown_key_names_line_and_suggests() {
        let text = MINIMAL.replace("table = \"ns.t\"", "table = \"ns.t\"\npartiton_by = []");
        let msg = parse_err(&text);
        assert!(msg.contains("p.toml: line 8"), "{msg}");
        assert!(msg.contains("unknown field `partiton_by`"), "{msg}");
        assert!(msg.contains("did you mean `partition_by`?"), "{msg}");
    }

    #[test]
    fn an_incremental_source_cannot_feed_a_partition_overwrite() {
        let spec = |mode: &str| {
            MINIMAL.replace(
                "[target]\ntable = \"ns.t\"",
                &format!(
                    "[[source]]\nname = \"up\"\nformat = \"iceberg\"\ntable = \"ns.up\"\nincremental = true\n\
                     [target]\ntable = \"ns.t\"\nmode = \"{mode}\"\npartition_by = [\"d\"]"
                ),
            )
        };
        let checked = |text: &str| {
            check(
                &parse(text, Path::new("p.toml")).unwrap(),
                Path::new("p.toml"),
            )
        };
        let err = checked(&spec("overwrite_partitions"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("source `up`: incremental = true"), "{err}");
        assert!(err.contains("mode = \"merge\""), "{err}");
        assert!(checked(&spec("append")).is_ok());
        // A full overwrite would keep only the new rows.
        let err = checked(&spec("overwrite")).unwrap_err().to_string();
        assert!(
            err.contains("replace the table with those rows alone"),
            "{err}"
        );
    }

    #[test]
    fn parameters_are_substituted_in_check_queries() {
        let text = format!(
            "{MINIMAL}\n[params]\nday = \"2024-01-01\"\nrefs = \"ns.days\"\n\
             [[check]]\nname = \"c\"\ntype = \"sql\"\nsql = \"SELECT * FROM result WHERE d <> '${{day}}'\"\n\
             [[check]]\nname = \"r\"\ntype = \"relationship\"\ncolumns = [\"d\"]\nto = \"${{refs}}\"\n"
        );
        let spec =
            crate::resolve_spec_text(&text, Path::new("p.toml"), Path::new("."), &[]).unwrap();
        assert_eq!(
            spec.spec.check[0].sql.as_deref(),
            Some("SELECT * FROM result WHERE d <> '2024-01-01'")
        );
        assert_eq!(spec.spec.check[1].to.as_deref(), Some("ns.days"));
    }

    #[test]
    fn a_partition_overwrite_needs_partitions() {
        let spec = |partition_by: &str| {
            MINIMAL.replace(
                "[target]\ntable = \"ns.t\"",
                &format!(
                    "[target]\ntable = \"ns.t\"\nmode = \"overwrite_partitions\"\n{partition_by}"
                ),
            )
        };
        let checked = |text: &str| {
            check(
                &parse(text, Path::new("p.toml")).unwrap(),
                Path::new("p.toml"),
            )
        };
        let err = checked(&spec("")).unwrap_err().to_string();
        assert!(
            err.contains("without partition_by the table is one partition"),
            "{err}"
        );
        assert!(checked(&spec("partition_by = [\"d\"]")).is_ok());
    }

    #[test]
    fn a_pipeline_name_is_one_line_and_a_stage_has_at_most_100000_tasks() {
        let checked = |text: &str| {
            check(
                &parse(text, Path::new("p.toml")).unwrap(),
                Path::new("p.toml"),
            )
        };
        let forged = MINIMAL.replace("name = \"p\"", "name = \"p\\nINFO job succeeded\"");
        let err = checked(&forged).unwrap_err().to_string();
        assert!(err.contains("control character"), "{err}");
        let huge = format!("{MINIMAL}\n[execution]\nshuffle_partitions = 4294967296\n");
        let err = checked(&huge).unwrap_err().to_string();
        assert!(err.contains("more than the 100000 tasks"), "{err}");
        let fine = format!("{MINIMAL}\n[execution]\nshuffle_partitions = 100000\n");
        assert!(checked(&fine).is_ok());
    }

    #[test]
    fn bad_format_is_rejected() {
        let text = format!(
            "{MINIMAL}\n[[source]]\nname = \"a\"\nformat = \"xlsx\"\nlocation = \"a.xlsx\"\n"
        );
        let msg = parse_err(&text);
        assert!(msg.contains("unknown variant `xlsx`"), "{msg}");
    }
}
