//! Partition retention: the partitions whose time range ended before a cut-off are dropped,
//! with every data and delete file in them, as one `delete` snapshot. The files stay in
//! storage while older snapshots reference them (expiry deletes them later).
//!
//! A partition's time range comes from the first field of its partition spec that is a time
//! transform (`year`, `month`, `day`, `hour`) or `identity` of a date or timestamp column.
//! A partition is dropped only when its whole range is older than the cut-off: `day =
//! 2024-01-01` ends at 2024-01-02T00:00, so a cut-off of 2024-01-02T00:00 or later drops it.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use chrono::{Datelike, NaiveDate};
use iceberg::spec::{
    Literal, PartitionSpec, PrimitiveLiteral, PrimitiveType, Schema, Struct, Transform, Type,
};
use iceberg::{Catalog, TableIdent};
use tracing::info;

use super::catalog::CatalogConfig;
use super::commit::{WrittenWith, commit_file_change};
use super::live::live_entries;
use super::overwrite::Replace;
use crate::error::{CoreError, Result};
use crate::ids::JobId;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// How a partition value maps to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeGrain {
    Hour,
    Day,
    Month,
    Year,
    /// `identity` of a date column (days since 1970-01-01).
    Date,
    /// `identity` of a timestamp column (microseconds since the epoch).
    Timestamp,
}

/// The position and grain of the first time field of `spec`, if it has one.
pub fn time_field(spec: &PartitionSpec, schema: &Schema) -> Option<(usize, TimeGrain)> {
    spec.fields().iter().enumerate().find_map(|(i, field)| {
        let grain = match field.transform {
            Transform::Hour => TimeGrain::Hour,
            Transform::Day => TimeGrain::Day,
            Transform::Month => TimeGrain::Month,
            Transform::Year => TimeGrain::Year,
            Transform::Identity => match schema.field_by_id(field.source_id)?.field_type.as_ref() {
                Type::Primitive(PrimitiveType::Date) => TimeGrain::Date,
                Type::Primitive(PrimitiveType::Timestamp | PrimitiveType::Timestamptz) => {
                    TimeGrain::Timestamp
                }
                _ => return None,
            },
            _ => return None,
        };
        Some((i, grain))
    })
}

/// When the time range of a partition with `value` ends (exclusive), in ms since the epoch.
/// `None` for a NULL or a value of an unexpected kind.
pub fn partition_end_ms(grain: TimeGrain, value: Option<&Literal>) -> Option<i64> {
    let Some(Literal::Primitive(value)) = value else {
        return None;
    };
    let start_of_month = |months_since_1970: i64| {
        let year = 1970 + months_since_1970.div_euclid(12);
        let month = months_since_1970.rem_euclid(12) as u32 + 1;
        let date = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, 1)?;
        Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
    };
    match (grain, value) {
        (TimeGrain::Hour, PrimitiveLiteral::Int(h)) => Some((*h as i64 + 1) * HOUR_MS),
        (TimeGrain::Day | TimeGrain::Date, PrimitiveLiteral::Int(d)) => {
            Some((*d as i64 + 1) * DAY_MS)
        }
        (TimeGrain::Month, PrimitiveLiteral::Int(m)) => start_of_month(*m as i64 + 1),
        (TimeGrain::Year, PrimitiveLiteral::Int(y)) => start_of_month((*y as i64 + 1) * 12),
        (TimeGrain::Timestamp, PrimitiveLiteral::Long(us)) => Some(us.div_euclid(1000) + 1),
        _ => None,
    }
}

/// What a retention run dropped (or, with `dry_run`, would drop).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Dropped {
    /// The partitions, as paths (`event_date_day=2024-01-01`).
    pub partitions: Vec<String>,
    pub data_files: usize,
    pub delete_files: usize,
    pub rows: u64,
    /// Files of partitions without a time field, left alone.
    pub files_without_time: usize,
    /// The `delete` snapshot (none when nothing was dropped, or on a dry run).
    pub snapshot_id: Option<i64>,
}

/// Drops the partitions whose time range ended more than `older_than` before `now_ms`, as
/// one `delete` snapshot.
pub async fn drop_old_partitions(
    catalog: &dyn Catalog,
    config: &CatalogConfig,
    ident: &TableIdent,
    older_than: Duration,
    (now_ms, dry_run): (i64, bool),
) -> Result<Dropped> {
    let table = catalog.load_table(ident).await?;
    let metadata = table.metadata();
    let Some(snapshot) = metadata.current_snapshot() else {
        return Ok(Dropped::default());
    };
    let cutoff = now_ms - older_than.as_millis() as i64;
    let schema = metadata.current_schema();
    let mut dropped = Dropped::default();
    let mut doomed: HashSet<String> = HashSet::new();
    let mut partitions: BTreeSet<String> = BTreeSet::new();
    for live in live_entries(&table, snapshot).await? {
        let Some(spec) = metadata.partition_spec_by_id(live.spec_id) else {
            continue;
        };
        let Some((index, grain)) = time_field(spec, schema) else {
            dropped.files_without_time += 1;
            continue;
        };
        let file = live.entry.data_file();
        let partition: &Struct = file.partition();
        let ends = partition_end_ms(
            grain,
            partition.fields().get(index).and_then(Option::as_ref),
        );
        if ends.is_none_or(|end| end > cutoff) {
            continue;
        }
        partitions.insert(spec.partition_to_path(partition, schema.clone()));
        doomed.insert(file.file_path().to_string());
        if file.content_type() == iceberg::spec::DataContentType::Data {
            dropped.data_files += 1;
            dropped.rows += file.record_count();
        } else {
            dropped.delete_files += 1;
        }
    }
    dropped.partitions = partitions.into_iter().collect();
    if doomed.is_empty() || dry_run {
        return Ok(dropped);
    }
    let job = JobId::parse(&crate::names::maintenance_id("retention"))
        .map_err(|e| CoreError::Protocol(format!("retention id: {e}")))?;
    let mut summary = std::collections::HashMap::new();
    summary.insert(
        super::commit::MAINTENANCE_PROPERTY.to_string(),
        "drop-partitions".to_string(),
    );
    let outcome = commit_file_change(
        catalog,
        config,
        ident,
        &job,
        (&[], WrittenWith::current(&table)),
        (Replace::Drop(&doomed), snapshot.snapshot_id()),
        summary,
    )
    .await?;
    dropped.snapshot_id = Some(outcome.snapshot_id);
    info!(
        partitions = dropped.partitions.len(),
        files = doomed.len(),
        snapshot_id = outcome.snapshot_id,
        "dropped partitions past retention"
    );
    Ok(dropped)
}

/// Days since 1970-01-01 of `date` (for tests and callers that think in dates).
pub fn epoch_days(date: NaiveDate) -> i32 {
    date.num_days_from_ce()
        - NaiveDate::from_ymd_opt(1970, 1, 1)
            .unwrap()
            .num_days_from_ce()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(date: &str) -> i64 {
        NaiveDate::parse_from_str(date, "%Y-%m-%d")
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis()
    }

    fn int(v: i32) -> Literal {
        Literal::Primitive(PrimitiveLiteral::Int(v))
    }

    #[test]
    fn each_grain_ends_where_its_range_ends() {
        let day = epoch_days(NaiveDate::from_ymd_opt(2024, 1, 31).unwrap());
        assert_eq!(
            partition_end_ms(TimeGrain::Day, Some(&int(day))),
            Some(ms("2024-02-01"))
        );
        assert_eq!(
            partition_end_ms(TimeGrain::Date, Some(&int(day))),
            Some(ms("2024-02-01"))
        );
        // Month 647 since 1970-01 is 2023-12: it ends where 2024 starts.
        assert_eq!(
            partition_end_ms(TimeGrain::Month, Some(&int(647))),
            Some(ms("2024-01-01"))
        );
        assert_eq!(
            partition_end_ms(TimeGrain::Year, Some(&int(54))),
            Some(ms("2025-01-01"))
        );
        assert_eq!(
            partition_end_ms(TimeGrain::Hour, Some(&int(1))),
            Some(2 * HOUR_MS)
        );
        let us = Literal::Primitive(PrimitiveLiteral::Long(1_500));
        assert_eq!(partition_end_ms(TimeGrain::Timestamp, Some(&us)), Some(2));
        // Before 1970 too.
        assert_eq!(
            partition_end_ms(TimeGrain::Month, Some(&int(-1))),
            Some(ms("1970-01-01"))
        );
        assert_eq!(partition_end_ms(TimeGrain::Day, None), None);
        assert_eq!(partition_end_ms(TimeGrain::Timestamp, Some(&int(3))), None);
    }

    #[test]
    fn the_first_time_field_counts() {
        use iceberg::spec::{NestedField, UnboundPartitionSpec};
        let schema = Schema::builder()
            .with_fields(vec![
                NestedField::optional(1, "region", Type::Primitive(PrimitiveType::String)).into(),
                NestedField::optional(2, "day", Type::Primitive(PrimitiveType::Date)).into(),
                NestedField::optional(3, "ts", Type::Primitive(PrimitiveType::Timestamp)).into(),
            ])
            .build()
            .unwrap();
        let spec = |fields: &[(i32, &str, Transform)]| {
            let mut b = UnboundPartitionSpec::builder();
            for (source, name, transform) in fields {
                b = b.add_partition_field(*source, *name, *transform).unwrap();
            }
            b.build().bind(std::sync::Arc::new(schema.clone())).unwrap()
        };
        let by_region_then_month = spec(&[
            (1, "region", Transform::Identity),
            (3, "ts_month", Transform::Month),
        ]);
        assert_eq!(
            time_field(&by_region_then_month, &schema),
            Some((1, TimeGrain::Month))
        );
        let by_date = spec(&[(2, "day", Transform::Identity)]);
        assert_eq!(time_field(&by_date, &schema), Some((0, TimeGrain::Date)));
        let by_region = spec(&[(1, "region", Transform::Identity)]);
        assert_eq!(time_field(&by_region, &schema), None);
    }
}
