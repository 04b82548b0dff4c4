//! The pipeline spec: what a nightly job reads, how it transforms it, where it publishes.
//!
//! A spec is a TOML file checked into version control next to its SQL. [`load_spec`] parses it
//! (rejecting unknown keys with a "did you mean" hint), applies `--param` overrides, substitutes
//! `${param}` references and returns a [`ResolvedSpec`] that the planner consumes.

mod check;
mod contract;
mod error;
mod maintenance;
mod model;
mod params;
mod partition;
mod suggest;

pub use check::{
    CheckKind, CheckSpec, DUPLICATE_ROWS_COLUMN, OnFail, REJECT_CHECK_COLUMN, REJECT_JOB_COLUMN,
    REJECT_REASON_COLUMN, REJECTS_SUFFIX, RELATIONSHIP_VIEW, RESULT, ROWS_COUNTED_COLUMN, Severity,
    rejects_table,
};
pub use contract::{ColumnContract, parse_column_type};
pub use error::SpecError;
pub use maintenance::MaintenanceSection;
pub use model::{
    ExecutionSection, OnSourceRewrite, PipelineSection, SchemaEvolution, SourceFormat, SourceSpec,
    Spec, TargetSpec, TransformSpec, WriteMode,
};
pub use params::substitute_params;
pub use partition::{PartitionField, PartitionTransform};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A spec with parameters applied and every relative path made absolute.
#[derive(Debug, Clone)]
pub struct ResolvedSpec {
    /// The spec file it was loaded from.
    pub path: PathBuf,
    /// Directory of the spec file; relative source locations resolve against it.
    pub base_dir: PathBuf,
    /// The spec with `${param}` references substituted.
    pub spec: Spec,
    /// The transform SQL, read from `sql_file` when given, parameters substituted.
    pub sql: String,
    /// Effective parameters: spec defaults overridden by the command line.
    pub params: BTreeMap<String, String>,
    /// Source schema contracts, parsed.
    pub contracts: BTreeMap<String, Vec<ColumnContract>>,
    /// Target partition fields, parsed.
    pub partition_by: Vec<PartitionField>,
    /// SHA-256 (hex) of the spec's text and its SQL's text as written (before parameters):
    /// which version of the pipeline's code made a snapshot.
    pub code_digest: String,
    /// The git commit of the spec's repository, when it is in one (`-dirty` when the
    /// checkout has uncommitted changes); recorded in the snapshot summary.
    pub git_commit: Option<String>,
}

/// Reads, parses and resolves the spec at `path` with `overrides` (from `--param k=v`).
pub fn load_spec(path: &Path, overrides: &[(String, String)]) -> Result<ResolvedSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base_dir = spec_dir(path).map_err(|source| SpecError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut spec = resolve_spec_text(&text, path, &base_dir, overrides)?;
    spec.git_commit = git_commit_of(&base_dir);
    Ok(spec)
}

/// The directory a spec's relative paths are relative to: its own, made absolute.
pub fn spec_dir(path: &Path) -> std::io::Result<PathBuf> {
    std::path::absolute(
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
}

/// The commit checked out in the git repository holding `dir`, with `-dirty` when tracked
/// files have uncommitted changes; `None` outside a repository or without git.
pub fn git_commit_of(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]).filter(|c| !c.is_empty())?;
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|changes| !changes.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

/// SHA-256 (hex) of a spec's text and its SQL's text.
fn code_digest(spec_text: &str, sql_text: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(spec_text.as_bytes());
    hasher.update([0u8]);
    hasher.update(sql_text.as_bytes());
    hex::encode(hasher.finalize())
}

/// Parses and resolves spec `text`; `path` is only used in messages. A `sql_file` is read
/// from `base_dir`.
pub fn resolve_spec_text(
    text: &str,
    path: &Path,
    base_dir: &Path,
    overrides: &[(String, String)],
) -> Result<ResolvedSpec, SpecError> {
    resolve(text, path, base_dir, overrides, &|file| {
        let sql_path = base_dir.join(file);
        std::fs::read_to_string(&sql_path).map_err(|source| SpecError::Read {
            path: sql_path,
            source,
        })
    })
}

/// Where a submitted spec says it comes from, in messages.
pub const SUBMITTED_SPEC: &str = "pipeline.toml";

/// Resolves a spec submitted to a coordinator, entirely from what the submission carries: a
/// `sql_file` is looked up in `files` under the name the spec gives, never read from the
/// coordinator's disk, and every source location must be absolute (the coordinator cannot
/// see the submitter's directory).
pub fn resolve_submitted(
    text: &str,
    files: &BTreeMap<String, String>,
    overrides: &[(String, String)],
) -> Result<ResolvedSpec, SpecError> {
    let path = Path::new(SUBMITTED_SPEC);
    let spec = resolve(text, path, Path::new("/"), overrides, &|file| {
        files.get(file).cloned().ok_or_else(|| {
            let sent = files.keys().map(String::as_str).collect::<Vec<_>>();
            SpecError::invalid(
                path,
                format!(
                    "[transform] sql_file `{file}` was not sent with the spec (sent: {}); \
                     `nightshift submit` sends the file the spec names",
                    if sent.is_empty() {
                        "none".to_string()
                    } else {
                        sent.join(", ")
                    }
                ),
            )
        })
    })?;
    if let Some(source) = spec.spec.source.iter().find(|s| {
        s.location
            .as_deref()
            .is_some_and(|l| !l.contains("://") && !l.starts_with('/'))
    }) {
        return Err(SpecError::invalid(
            path,
            format!(
                "source `{}`: location `{}` is relative; a submitted spec must name absolute \
                 locations (s3://bucket/path or /path), the coordinator cannot see the \
                 submitter's directory",
                source.name,
                source.location.as_deref().unwrap_or_default()
            ),
        ));
    }
    Ok(spec)
}

fn resolve(
    text: &str,
    path: &Path,
    base_dir: &Path,
    overrides: &[(String, String)],
    read_sql_file: &dyn Fn(&str) -> Result<String, SpecError>,
) -> Result<ResolvedSpec, SpecError> {
    let spec = model::parse(text, path)?;
    let params = params::effective_params(&spec.params, overrides)?;
    let sql_text = match (&spec.transform.sql, &spec.transform.sql_file) {
        (Some(sql), None) => sql.clone(),
        (None, Some(file)) => read_sql_file(file)?,
        (Some(_), Some(_)) => {
            return Err(SpecError::invalid(
                path,
                "[transform] has both `sql` and `sql_file`; keep one",
            ));
        }
        (None, None) => {
            return Err(SpecError::invalid(
                path,
                "[transform] needs `sql = \"...\"` or `sql_file = \"transform.sql\"`",
            ));
        }
    };
    let code_digest = code_digest(text, &sql_text);
    let mut budget = params::MAX_SUBSTITUTED_BYTES;
    let sql = params::substitute_within(&sql_text, &params, "[transform] sql", &mut budget)?;
    let spec = model::substitute(spec, &params, &mut budget)?;
    model::check(&spec, path)?;
    let mut contracts = BTreeMap::new();
    for source in &spec.source {
        let parsed = contract::parse_contract(&source.name, &source.schema)?;
        contracts.insert(source.name.clone(), parsed);
    }
    let partition_by = spec
        .target
        .partition_by
        .iter()
        .map(|p| partition::parse_partition_field(p))
        .collect::<Result<Vec<_>, _>>()?;
    partition::check_not_redundant(&partition_by, &spec.target.partition_by)?;
    Ok(ResolvedSpec {
        path: path.to_path_buf(),
        base_dir: base_dir.to_path_buf(),
        spec,
        sql,
        params,
        contracts,
        partition_by,
        code_digest,
        git_commit: None,
    })
}

/// Parses `k=v` as given to `--param`.
pub fn parse_param_arg(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{arg}`")),
    }
}
