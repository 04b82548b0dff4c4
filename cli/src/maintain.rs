//! `nightshift maintain`: expire old snapshots and remove orphan files of one table.

use std::time::Duration;

use nightshift_core::CoreError;
use nightshift_core::table::maintain::{ExpirePolicy, expire_snapshots, remove_orphans};
use nightshift_core::table::{CatalogConfig, open_existing_table};

/// What to do.
#[derive(Debug, Clone, Default)]
pub struct Maintenance {
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
    pub expired_snapshots: Vec<i64>,
    pub files_deleted_by_expiry: usize,
    pub orphans: Vec<String>,
}

/// Runs `work` on `table`: expiry first (its unreferenced files go with it), then orphans.
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
    let verb = if report.dry_run {
        "would expire"
    } else {
        "expired"
    };
    let mut out = format!(
        "table {}\n  {verb} {} snapshot(s){}\n",
        report.table,
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
