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
    /// Whether expiry and orphan removal were asked for: the text reports only what was.
    #[serde(skip)]
    pub asked: Asked,
}

/// Which of the operations that report even when they did nothing were asked for.
#[derive(Debug, Default, Clone, Copy)]
pub struct Asked {
    pub expiry: bool,
    pub orphans: bool,
}

/// Runs `work` on `table`: partition retention first (nothing to compact there), then
/// compaction (the files both replace stay referenced by older snapshots until they
/// expire), then expiry (its unreferenced files go with it), then orphans. With `cluster`,
/// compaction's rewrite runs as a job of that cluster, its tasks on the workers; the other
/// operations only change metadata and delete files, and run here.
pub async fn maintain(
    catalog: &CatalogConfig,
    table: &str,
    work: &Maintenance,
    cluster: Option<&nightshift_cluster::ClusterConfig>,
) -> Result<MaintenanceReport, CoreError> {
    let (opened, ident) = open_existing_table(catalog, table).await?;
    let mut report = MaintenanceReport {
        table: table.to_string(),
        dry_run: work.dry_run,
        asked: Asked {
            expiry: work.expire.is_some(),
            orphans: work.orphans_older_than.is_some(),
        },
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
        report.compacted = Some(match cluster {
            Some(config) if !work.dry_run => {
                let table = opened.load_table(&ident).await?;
                compact_on_cluster(config, &table, policy).await?
            }
            _ => compact(opened.as_ref(), catalog, &ident, policy, work.dry_run).await?,
        });
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

/// How long `maintain --cluster` waits for its compaction job.
const CLUSTER_COMPACTION_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Compacts `table` as a job of the cluster (`mode = "compact"`): the coordinator chooses
/// the files again when it plans (so what it rewrites is what the table holds then), the
/// workers read and write them, and the coordinator commits the `replace` snapshot. Nothing
/// is submitted when nothing is to be rewritten.
async fn compact_on_cluster(
    config: &nightshift_cluster::ClusterConfig,
    table: &iceberg::table::Table,
    policy: CompactPolicy,
) -> Result<Compacted, CoreError> {
    let plan = nightshift_core::table::compact::plan_compaction(table, policy).await?;
    let mut done = plan.report.clone();
    if plan.groups.is_empty() {
        return Ok(done);
    }
    let metadata = table.metadata();
    let partition_by = nightshift_core::table::compact::partition_by_entries(
        metadata.default_partition_spec(),
        metadata.current_schema(),
    )?;
    let name = table.identifier().to_string();
    let dir =
        tempfile::tempdir().map_err(|e| CoreError::io("a directory for the compaction spec", e))?;
    let spec = dir.path().join("compact.toml");
    std::fs::write(&spec, compaction_spec(&name, &partition_by, policy))
        .map_err(|e| CoreError::io(format!("write {}", spec.display()), e))?;
    let job = nightshift_core::JobId::parse(&nightshift_core::names::maintenance_id("compact-job"))
        .map_err(CoreError::Protocol)?;
    tracing::info!(%job, table = %name, files = done.files_rewritten, "compaction submitted to the cluster");
    let outcome = crate::cluster::submit_and_wait(
        config,
        &spec,
        &job,
        Vec::new(),
        CLUSTER_COMPACTION_TIMEOUT,
    )
    .await?;
    if outcome["status"] != "succeeded" {
        return Err(CoreError::Target {
            table: name,
            message: format!(
                "compaction job {job} failed: {}",
                outcome["error"].as_str().unwrap_or("no error given")
            ),
        });
    }
    done.files_written = outcome["files"].as_u64().unwrap_or_default() as usize;
    done.snapshot_id = outcome["snapshot_id"].as_i64();
    Ok(done)
}

/// The spec of a compaction job of `table`: the table is its one source and its target,
/// every row selected unchanged, partitioned as the table is, `policy` in `[maintenance]`.
pub fn compaction_spec(table: &str, partition_by: &[String], policy: CompactPolicy) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut spec = format!(
        "[pipeline]\nname = {}\n\n[[source]]\nname = \"compacted\"\nformat = \"iceberg\"\ntable = {}\n\n\
         [transform]\nsql = \"SELECT * FROM compacted\"\n\n[target]\ntable = {}\nmode = \"compact\"\n",
        quote(&format!("compact {table}")),
        quote(table),
        quote(table),
    );
    if !partition_by.is_empty() {
        let entries: Vec<String> = partition_by.iter().map(|p| quote(p)).collect();
        spec.push_str(&format!("partition_by = [{}]\n", entries.join(", ")));
    }
    spec.push_str(&format!(
        "\n[maintenance]\ncompact = true\nmin_input_files = {}\n",
        policy.min_input_files
    ));
    if let Some(bytes) = policy.target_file_bytes {
        spec.push_str(&format!("target_file_size_bytes = {bytes}\n"));
    }
    spec
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
        "table {}\n{}{}",
        report.table,
        dropped.unwrap_or_default(),
        compacted.unwrap_or_default(),
    );
    if report.asked.expiry {
        out.push_str(&format!(
            "  {verb} {} snapshot(s){}\n",
            report.expired_snapshots.len(),
            if report.dry_run {
                String::new()
            } else {
                format!(
                    ", deleting {} file(s) only they referenced",
                    report.files_deleted_by_expiry
                )
            }
        ));
    }
    if report.asked.orphans {
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
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_reports_only_what_was_asked() {
        let compacted = MaintenanceReport {
            table: "t.t".into(),
            compacted: Some(Compacted::default()),
            ..Default::default()
        };
        let text = report_text(&compacted);
        assert!(text.contains("compacted 0 small file(s)"), "{text}");
        assert!(
            !text.contains("expired") && !text.contains("orphan"),
            "{text}"
        );
        let everything = MaintenanceReport {
            asked: Asked {
                expiry: true,
                orphans: true,
            },
            ..compacted
        };
        let text = report_text(&everything);
        assert!(
            text.contains("expired 0 snapshot(s)") && text.contains("removed 0 orphan file(s)"),
            "{text}"
        );
    }

    #[test]
    fn the_compaction_spec_is_a_valid_compact_spec() {
        let policy = CompactPolicy {
            target_file_bytes: Some(1 << 20),
            min_input_files: 3,
        };
        let entries = ["day(ts)".to_string(), "bucket(8, id)".to_string()];
        let text = compaction_spec("sales.daily", &entries, policy);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("compact.toml");
        std::fs::write(&path, &text).unwrap();
        let spec = nightshift_spec::load_spec(&path, &[]).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(spec.spec.target.mode, nightshift_spec::WriteMode::Compact);
        assert_eq!(spec.spec.target.table, "sales.daily");
        assert_eq!(spec.partition_by.len(), 2);
        assert_eq!(spec.spec.maintenance.min_input_files, Some(3));
        assert_eq!(spec.spec.maintenance.target_file_size_bytes, Some(1 << 20));
        // The same spec with another SQL, another source table, or no compaction policy is
        // refused, naming the mode.
        for (from, to) in [
            ("SELECT * FROM compacted", "SELECT id FROM compacted"),
            (
                "table = \"sales.daily\"\n\n[transform]",
                "table = \"sales.other\"\n\n[transform]",
            ),
            ("compact = true", "compact = false"),
        ] {
            let changed = text.replacen(from, to, 1);
            assert_ne!(changed, text, "{from}");
            std::fs::write(&path, changed).unwrap();
            let refused = nightshift_spec::load_spec(&path, &[])
                .unwrap_err()
                .to_string();
            assert!(refused.contains("mode = \"compact\""), "{refused}");
        }
    }
}
