//! `nightshift history TABLE`: the table's snapshots, newest first, with the jobs, the code
//! and the inputs that made them (what `coordinator::lineage` wrote in each summary).

use std::collections::BTreeMap;

use nightshift_core::CoreError;
use nightshift_core::table::{CatalogConfig, open_existing_table};

/// One snapshot of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotEntry {
    pub snapshot_id: i64,
    pub parent_id: Option<i64>,
    pub committed_at_ms: i64,
    pub operation: String,
    /// The table's current snapshot.
    pub current: bool,
    /// The whole summary (Iceberg's counts and Nightshift's lineage).
    pub summary: BTreeMap<String, String>,
}

/// Every snapshot of `table`, newest first.
pub async fn history(
    catalog: &CatalogConfig,
    table: &str,
) -> Result<Vec<SnapshotEntry>, CoreError> {
    let (opened, ident) = open_existing_table(catalog, table).await?;
    let loaded = opened.load_table(&ident).await?;
    let metadata = loaded.metadata();
    let current = metadata.current_snapshot_id();
    let mut entries: Vec<SnapshotEntry> = metadata
        .snapshots()
        .map(|s| {
            let summary = s.summary();
            SnapshotEntry {
                snapshot_id: s.snapshot_id(),
                parent_id: s.parent_snapshot_id(),
                committed_at_ms: s.timestamp_ms(),
                operation: summary.operation.as_str().to_string(),
                current: current == Some(s.snapshot_id()),
                summary: summary
                    .additional_properties
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }
        })
        .collect();
    entries.sort_by_key(|e| std::cmp::Reverse((e.committed_at_ms, e.snapshot_id)));
    Ok(entries)
}

/// The history for people: a block per snapshot.
pub fn history_text(table: &str, entries: &[SnapshotEntry]) -> String {
    if entries.is_empty() {
        return format!("{table} has no snapshots\n");
    }
    let mut text = String::new();
    for entry in entries {
        let get = |key: &str| entry.summary.get(key).map(String::as_str);
        let at = std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(entry.committed_at_ms.max(0) as u64);
        text.push_str(&format!(
            "snapshot {}{}  {}  {}\n",
            entry.snapshot_id,
            if entry.current { " (current)" } else { "" },
            humantime::format_rfc3339_seconds(at),
            entry.operation
        ));
        if let Some(job) = get("nightshift.job-id") {
            let by = match (get("nightshift.pipeline"), get("nightshift.maintenance")) {
                (Some(pipeline), _) => format!("pipeline {pipeline}"),
                (None, Some(maintenance)) => format!("maintenance: {maintenance}"),
                (None, None) => "pipeline ?".to_string(),
            };
            text.push_str(&format!("  job      {job} ({by})\n"));
        }
        let mut code = Vec::new();
        if let Some(digest) = get("nightshift.code-sha256") {
            code.push(format!("sha256 {}", &digest[..digest.len().min(12)]));
        }
        if let Some(commit) = get("nightshift.git-commit") {
            code.push(format!("git {commit}"));
        }
        if !code.is_empty() {
            text.push_str(&format!("  code     {}\n", code.join(", ")));
        }
        let prefixed = |prefix: &str| -> Vec<String> {
            entry
                .summary
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|name| format!("{name}: {v}")))
                .collect()
        };
        let params: Vec<String> = prefixed("nightshift.param.")
            .into_iter()
            .map(|p| p.replacen(": ", "=", 1))
            .collect();
        if !params.is_empty() {
            text.push_str(&format!("  params   {}\n", params.join(", ")));
        }
        for input in prefixed("nightshift.input.") {
            text.push_str(&format!("  input    {input}\n"));
        }
        text.push_str(&format!(
            "  added    {} rows, {} files\n",
            get("added-records").unwrap_or("0"),
            get("added-data-files").unwrap_or("0")
        ));
        // An overwrite, a retention drop or a compaction also removes: say so, and what the
        // table holds after, or "added 0 rows" reads as a run that changed nothing.
        let deleted_files = get("deleted-data-files").unwrap_or("0");
        if deleted_files != "0" {
            text.push_str(&format!(
                "  deleted  {} rows, {deleted_files} files\n",
                get("deleted-records").unwrap_or("0"),
            ));
        }
        if let Some(total) = get("total-records") {
            text.push_str(&format!("  table    {total} rows after it\n"));
        }
        for check in prefixed("nightshift.check.") {
            text.push_str(&format!("  check    {check}\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_reads_as_its_job_code_inputs_and_checks() {
        let summary = [
            ("nightshift.job-id", "nightly-1"),
            ("nightshift.pipeline", "accounts"),
            ("nightshift.code-sha256", "0123456789abcdef0123"),
            ("nightshift.git-commit", "cafe"),
            ("nightshift.param.day", "2024-01-01"),
            ("nightshift.input.accounts", "files=1 bytes=120"),
            ("nightshift.check.rows", "passed"),
            ("added-records", "5"),
            ("added-data-files", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let entry = SnapshotEntry {
            snapshot_id: 7,
            parent_id: None,
            committed_at_ms: 0,
            operation: "append".into(),
            current: true,
            summary,
        };
        assert_eq!(
            history_text("a.b", &[entry]),
            "snapshot 7 (current)  1970-01-01T00:00:00Z  append\n\
             \x20 job      nightly-1 (pipeline accounts)\n\
             \x20 code     sha256 0123456789ab, git cafe\n\
             \x20 params   day=2024-01-01\n\
             \x20 input    accounts: files=1 bytes=120\n\
             \x20 added    5 rows, 1 files\n\
             \x20 check    rows: passed\n"
        );
        assert_eq!(history_text("a.b", &[]), "a.b has no snapshots\n");
        // A compaction: it removed as many rows as it added, and says whose it is.
        let summary = [
            ("nightshift.job-id", "compact-job-1"),
            ("nightshift.maintenance", "compact"),
            ("added-records", "1200"),
            ("added-data-files", "2"),
            ("deleted-records", "1200"),
            ("deleted-data-files", "40"),
            ("total-records", "1200"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let compaction = SnapshotEntry {
            snapshot_id: 8,
            parent_id: Some(7),
            committed_at_ms: 0,
            operation: "replace".into(),
            current: true,
            summary,
        };
        assert_eq!(
            history_text("a.b", &[compaction]),
            "snapshot 8 (current)  1970-01-01T00:00:00Z  replace\n\
             \x20 job      compact-job-1 (maintenance: compact)\n\
             \x20 added    1200 rows, 2 files\n\
             \x20 deleted  1200 rows, 40 files\n\
             \x20 table    1200 rows after it\n"
        );
    }
}
