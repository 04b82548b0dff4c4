//! `nightshift maintain`: compact small files, expire old snapshots and remove orphan files
//! of one table.

use std::time::Duration;

use nightshift_core::CoreError;
use nightshift_core::table::compact::{CompactPolicy, Compacted, compact};
use nightshift_core::table::maintain::{ExpirePolicy, expire_snapshots, remove_orphans};
use nightshift_core::table::retention::{Dropped, drop_old_partitions};
use nightshift_core::table::{CatalogConfig, open_existing_table};

/// What to do.
#[derive(Debug, Clone, Default)]
pub struct Maintenance {
    /// Drop partitions whose time range ended longer ago than this.
    pub drop_partitions_older_than: Option<Duration>,
    pub compact: Option<CompactPolicy>,
    pub expire: Option<ExpirePolicy>,
    /// Remove files no snapshot references that are older than this.
    pub orphans_older_than: Option<Duration>,
    pub dry_run: bool,
}

/// What was done (or, with `dry_run`, would be).
#[derive(Debug, Default, serde::Serialize)]
pub struct MaintenanceReport {
    pub table: String,
    pub dry_run: bool,
    /// What partition retention dropped (absent when not asked for).
    pub dropped: Option<Dropped>,
    /// What compaction did (absent when not asked for).
    pub compacted: Option<Compacted>,
    pub expired_snapshots: Vec<i64>,
    pub files_deleted_by_expiry: usize,
    pub orphans: Vec<String>,
}

/// Runs `work` on `table`: partition retention first (nothing to compact there), then
/// compaction (the files both replace stay referenced by older snapshots until they
/// expire), then expiry (its unreferenced files go with it), then orphans.
pub async fn maintain(
    catalog: &CatalogConfig,
    table: &str,
    work: &Maintenance,
) -> Result<MaintenanceReport, CoreError> {
    let (opened, ident) = open_existing_table(catalog, table).await?;
    let mut report = MaintenanceReport {
        table: table.to_string(),
        dry_run: work.dry_run,
        ..Default::default()
    };
    if let Some(age) = work.drop_partitions_older_than {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        report.dropped = Some(
            drop_old_partitions(opened.as_ref(), catalog, &ident, age, (now, work.dry_run)).await?,
        );
    }
    if let Some(policy) = work.compact {
        report.compacted =
            Some(compact(opened.as_ref(), catalog, &ident, policy, work.dry_run).await?);
    }
    if let Some(policy) = work.expire {
        let expired =
            expire_snapshots(opened.as_ref(), catalog, &ident, policy, work.dry_run).await?;
        report.expired_snapshots = expired.snapshots;
        report.files_deleted_by_expiry = expired.files_deleted;
    }
    if let Some(age) = work.orphans_older_than {
        report.orphans = remove_orphans(opened.as_ref(), &ident, age, work.dry_run).await?;
    }
    Ok(report)
}

/// The report for people.
pub fn report_text(report: &MaintenanceReport) -> String {
    let dropped = report.dropped.as_ref().map(|d| {
        let verb = if report.dry_run {
            "would drop"
        } else {
            "dropped"
        };
        let mut text = format!(
            "  {verb} {} partition(s): {} data file(s), {} delete file(s), {} row(s){}\n",
            d.partitions.len(),
            d.data_files,
            d.delete_files,
            d.rows,
            d.snapshot_id
                .map(|s| format!(", snapshot {s}"))
                .unwrap_or_default()
        );
        for partition in &d.partitions {
            text.push_str(&format!("    {partition}\n"));
        }
        if d.files_without_time > 0 {
            text.push_str(&format!(
                "    ({} file(s) in partitions without a time field left alone)\n",
                d.files_without_time
            ));
        }
        text
    });
    let compacted = report.compacted.as_ref().map(|c| {
        let verb = if report.dry_run {
            "would compact"
        } else {
            "compacted"
        };
        let mut line = format!(
            "  {verb} {} small file(s) ({}) in {} partition(s)",
            c.files_rewritten,
            indicatif::HumanBytes(c.bytes_rewritten),
            c.partitions
        );
        if let Some(snapshot) = c.snapshot_id {
            line.push_str(&format!(
                " into {} file(s), snapshot {snapshot}",
                c.files_written
            ));
        }
        if c.skipped_with_deletes > 0 {
            line.push_str(&format!(
                "; {} small file(s) with delete files left alone",
                c.skipped_with_deletes
            ));
        }
        line + "\n"
    });
    let verb = if report.dry_run {
        "would expire"
    } else {
        "expired"
    };
    let mut out = format!(
        "table {}\n{}{}  {verb} {} snapshot(s){}\n",
        report.table,
        dropped.unwrap_or_default(),
        compacted.unwrap_or_default(),
        report.expired_snapshots.len(),
        if report.dry_run {
            String::new()
        } else {
            format!(
                ", deleting {} file(s) only they referenced",
                report.files_deleted_by_expiry
            )
        }
    );
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    out.push_str(&format!(
        "  {verb} {} orphan file(s)\n",
        report.orphans.len()
    ));
    for orphan in &report.orphans {
        out.push_str(&format!("    {orphan}\n"));
    }
    out
}
