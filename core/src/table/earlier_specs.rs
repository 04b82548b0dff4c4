//! Files written under an earlier partition spec, met by a partition overwrite.
//!
//! A partition overwrite replaces whole files: those of the partitions (of the spec it wrote
//! with) its rows fall in. After another engine changed the table's partition spec (say
//! `month(ts)` to `day(ts)`), a file of the old spec holds rows of many new partitions, and
//! its partition value in the old spec says nothing about the new ones. Keeping it kept the
//! replaced day's old rows beside the new ones (each row twice, exit 0); removing it would
//! drop the month's other days. Neither is an overwrite of that day, so such a commit is
//! refused. Whether a file may hold rows of a partition is judged from its column bounds
//! ([`may_hold_rows_of`]): a nightly run of a day the old files cannot hold goes through.

use std::collections::HashSet;

use iceberg::spec::{
    DataContentType, DataFile, Datum, Literal, PartitionField, PartitionSpec, PrimitiveLiteral,
    Struct,
};
use iceberg::transform::create_transform_function;

/// Whether `file` (of another spec than `spec`) may hold a row of one of `partitions`
/// (values of `spec`, widened as the overwrite compares them). Only the fields whose
/// transform keeps order (identity, truncate, year, month, day, hour) can rule a partition
/// out, by the file's lower and upper bound of their source column; a field without bounds,
/// with a NULL value, or of another kind says "may".
pub fn may_hold_rows_of(
    file: &DataFile,
    spec: &PartitionSpec,
    partitions: &HashSet<Struct>,
) -> bool {
    // A delete file applies to files of its own spec, which are judged themselves.
    if file.content_type() != DataContentType::Data {
        return false;
    }
    partitions.iter().any(|partition| {
        spec.fields()
            .iter()
            .zip(partition.iter())
            .all(|(field, value)| field_may_hold(file, field, value))
    })
}

/// Whether `file`'s rows may have `value` for partition field `field`.
fn field_may_hold(file: &DataFile, field: &PartitionField, value: Option<&Literal>) -> bool {
    let Some(Literal::Primitive(value)) = value else {
        return true;
    };
    if !field.transform.preserves_order() {
        return true;
    }
    let (Some(lower), Some(upper)) = (
        file.lower_bounds().get(&field.source_id),
        file.upper_bounds().get(&field.source_id),
    ) else {
        return true;
    };
    let Ok(transform) = create_transform_function(&field.transform) else {
        return true;
    };
    let bound = |datum: &Datum| transform.transform_literal(datum).ok().flatten();
    let (Some(low), Some(high)) = (bound(lower), bound(upper)) else {
        return true;
    };
    let (value, mut low, high) = (
        widened(value),
        widened(low.literal()),
        widened(high.literal()),
    );
    // iceberg-rust's time transforms round toward zero before 1970 (the writer floors, see
    // `partition_values`): the first row's true partition may be one lower.
    if let PrimitiveLiteral::Long(n) = &mut low
        && *n < 0
    {
        *n -= 1;
    }
    // Bounds and value of one kind compare; another kind (a type changed) says "may".
    let same_kind = std::mem::discriminant(&value) == std::mem::discriminant(&low)
        && std::mem::discriminant(&value) == std::mem::discriminant(&high);
    !same_kind || (low <= value && value <= high)
}

/// `int` as `long` and `float` as `double`, as the overwrite compares partition values.
fn widened(literal: &PrimitiveLiteral) -> PrimitiveLiteral {
    match literal {
        PrimitiveLiteral::Int(v) => PrimitiveLiteral::Long(i64::from(*v)),
        PrimitiveLiteral::Float(v) => PrimitiveLiteral::Double(f64::from(v.0).into()),
        other => other.clone(),
    }
}

/// The refusal of a partition overwrite that met `file`, written under partition spec
/// `file_spec`, which may hold rows of the partitions it replaces.
pub fn refusal(file: &str, file_spec: &PartitionSpec, spec: &PartitionSpec) -> String {
    let shown = |spec: &PartitionSpec| {
        spec.fields()
            .iter()
            .map(|f| format!("{} = {}", f.name, f.transform))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "the data file {file}, written under an earlier partition spec of the table (spec {}: {}), may hold rows of the partitions this run replaces (spec {}: {}): an overwrite of partitions replaces whole files, so it would either keep that file's old rows beside the new ones or drop its rows of other partitions. Nothing was committed. Rewrite the table's old files under the current spec first (e.g. one run with mode = \"overwrite\" of the whole table, or Spark's rewrite_data_files), or use mode = \"merge\"",
        file_spec.spec_id(),
        shown(file_spec),
        spec.spec_id(),
        shown(spec)
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use iceberg::spec::{
        DataFileBuilder, DataFileFormat, NestedField, PrimitiveType, Schema, Transform, Type,
    };

    use super::*;

    /// A table of `ts` (timestamp, id 1) and `region` (string, id 2), partitioned by `fields`.
    fn spec(fields: &[(i32, Transform)]) -> PartitionSpec {
        let schema = Schema::builder()
            .with_fields(vec![
                NestedField::optional(1, "ts", Type::Primitive(PrimitiveType::Timestamp)).into(),
                NestedField::optional(2, "region", Type::Primitive(PrimitiveType::String)).into(),
            ])
            .build()
            .unwrap();
        let mut builder = PartitionSpec::builder(std::sync::Arc::new(schema)).with_spec_id(1);
        for (i, (source, transform)) in fields.iter().enumerate() {
            builder = builder
                .add_partition_field(
                    if *source == 1 { "ts" } else { "region" },
                    format!("f{i}"),
                    *transform,
                )
                .unwrap();
        }
        builder.build().unwrap()
    }

    /// A data file of the old spec whose `ts` runs from `lower` to `upper` (ISO text), all in
    /// region `eu`; `None`: no bounds.
    fn old_file(ts: Option<(&str, &str)>, content: DataContentType) -> DataFile {
        let mut lower = HashMap::from([(2, Datum::string("eu"))]);
        let mut upper = lower.clone();
        if let Some((low, high)) = ts {
            lower.insert(1, Datum::timestamp_from_str(low).unwrap());
            upper.insert(1, Datum::timestamp_from_str(high).unwrap());
        }
        DataFileBuilder::default()
            .content(content)
            .file_format(DataFileFormat::Parquet)
            .file_path("old.parquet".to_string())
            .file_size_in_bytes(1)
            .record_count(1)
            .partition_spec_id(0)
            .partition(Struct::empty())
            .lower_bounds(lower)
            .upper_bounds(upper)
            .build()
            .unwrap()
    }

    /// Partitions as the overwrite compares them (a day as days since 1970, widened).
    fn days(days: &[Option<i64>]) -> HashSet<Struct> {
        days.iter()
            .map(|d| Struct::from_iter([d.map(Literal::long)]))
            .collect()
    }

    #[test]
    fn a_file_of_an_earlier_spec_may_hold_a_partition_only_within_its_bounds() {
        let by_day = spec(&[(1, Transform::Day)]);
        // A month file of January 2024 (days 19723 to 19753).
        let january = old_file(
            Some(("2024-01-01T00:00:00", "2024-01-31T23:59:59")),
            DataContentType::Data,
        );
        assert!(may_hold_rows_of(&january, &by_day, &days(&[Some(19_737)])));
        assert!(may_hold_rows_of(&january, &by_day, &days(&[Some(19_723)])));
        assert!(may_hold_rows_of(&january, &by_day, &days(&[Some(19_753)])));
        // February 1st, or the day before January: not in it.
        assert!(!may_hold_rows_of(&january, &by_day, &days(&[Some(19_754)])));
        assert!(!may_hold_rows_of(&january, &by_day, &days(&[Some(19_722)])));
        assert!(may_hold_rows_of(
            &january,
            &by_day,
            &days(&[Some(19_754), Some(19_740)])
        ));
        // The NULL partition, a file without bounds, or a bucket cannot be ruled out.
        assert!(may_hold_rows_of(&january, &by_day, &days(&[None])));
        let unbounded = old_file(None, DataContentType::Data);
        assert!(may_hold_rows_of(
            &unbounded,
            &by_day,
            &days(&[Some(19_754)])
        ));
        let by_bucket = spec(&[(1, Transform::Bucket(4))]);
        assert!(may_hold_rows_of(&january, &by_bucket, &days(&[Some(1)])));
        // One field ruling it out is enough: February in `eu`, or January in `us`.
        let by_region_day = spec(&[(2, Transform::Identity), (1, Transform::Day)]);
        let of = |region: &str, day: i64| {
            HashSet::from([Struct::from_iter([
                Some(Literal::string(region)),
                Some(Literal::long(day)),
            ])])
        };
        assert!(may_hold_rows_of(
            &january,
            &by_region_day,
            &of("eu", 19_740)
        ));
        assert!(!may_hold_rows_of(
            &january,
            &by_region_day,
            &of("eu", 19_754)
        ));
        assert!(!may_hold_rows_of(
            &january,
            &by_region_day,
            &of("us", 19_740)
        ));
        // A delete file is not judged (its data files are).
        let deletes = old_file(None, DataContentType::PositionDeletes);
        assert!(!may_hold_rows_of(&deletes, &by_day, &days(&[Some(19_740)])));
    }

    #[test]
    fn before_1970_the_first_rows_day_may_be_one_lower_than_iceberg_rust_says() {
        // 1969-12-30 23:59:59.5 is day -2; iceberg-rust's transform says day -1.
        let file = old_file(
            Some(("1969-12-30T23:59:59.500", "1970-01-01T10:00:00")),
            DataContentType::Data,
        );
        let by_day = spec(&[(1, Transform::Day)]);
        assert!(may_hold_rows_of(&file, &by_day, &days(&[Some(-2)])));
        assert!(!may_hold_rows_of(&file, &by_day, &days(&[Some(-4)])));
        assert!(!may_hold_rows_of(&file, &by_day, &days(&[Some(1)])));
    }

    #[test]
    fn the_refusal_names_the_file_and_both_specs() {
        let old = spec(&[(1, Transform::Month)]);
        let new = spec(&[(1, Transform::Day)]);
        let why = refusal("s3://b/t/data/old.parquet", &old, &new);
        assert!(
            why.starts_with("the data file s3://b/t/data/old.parquet, written under an earlier partition spec of the table (spec 1: f0 = month)"),
            "{why}"
        );
        assert!(
            why.contains("(spec 1: f0 = day)") && why.contains("Nothing was committed"),
            "{why}"
        );
    }
}
