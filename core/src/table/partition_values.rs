//! The partition of each row a task writes: iceberg-rust's partition transforms, with its
//! `day` of a timestamp corrected.
//!
//! iceberg-rust 0.10.1's `day` of a `timestamp` or `timestamptz` rounds toward zero before
//! 1970 for values in the last second of a day (`Day::day_timestamp_micro`): the row
//! `1969-12-30 23:59:59.5` was filed under 1969-12-31. Readers that prune by partition then
//! lost it (a PyIceberg filter for 1969-12-30 returned 1 of its 2 rows), and an
//! `overwrite_partitions` of 1969-12-31 deleted it. Iceberg's specification, Java and
//! PyIceberg floor: the day is `micros.div_euclid(86_400_000_000)`. Every other transform
//! is iceberg-rust's own.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int32Array, StructArray, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::{DataType, Int64Type, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use iceberg::arrow::{PartitionValueCalculator, arrow_struct_to_literal};
use iceberg::spec::{
    Literal, PartitionKey, PartitionSpecRef, PrimitiveType, SchemaRef, Struct, Transform, Type,
};
use iceberg::{Error, ErrorKind};

/// Splits batches into the rows of each table partition.
pub(crate) struct PartitionSplitter {
    calculator: PartitionValueCalculator,
    spec: PartitionSpecRef,
    schema: SchemaRef,
    /// The `day` fields of a timestamp source: the field's position and the source
    /// column's name (top-level columns; a nested source keeps iceberg-rust's value).
    days: Vec<(usize, String)>,
}

impl PartitionSplitter {
    pub(crate) fn try_new(schema: SchemaRef, spec: PartitionSpecRef) -> iceberg::Result<Self> {
        let calculator = PartitionValueCalculator::try_new(&spec, &schema)?;
        let days = spec
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| f.transform == Transform::Day)
            .filter_map(|(i, f)| {
                let field = schema.field_by_id(f.source_id)?;
                let timestamp = matches!(
                    field.field_type.as_ref(),
                    Type::Primitive(
                        PrimitiveType::Timestamp
                            | PrimitiveType::Timestamptz
                            | PrimitiveType::TimestampNs
                            | PrimitiveType::TimestamptzNs
                    )
                );
                let top_level = schema.name_by_field_id(f.source_id) == Some(field.name.as_str());
                (timestamp && top_level).then(|| (i, field.name.clone()))
            })
            .collect();
        Ok(PartitionSplitter {
            calculator,
            spec,
            schema,
            days,
        })
    }

    /// The rows of `batch` by partition, partitions in the order their first rows come.
    pub(crate) fn split(
        &self,
        batch: &RecordBatch,
    ) -> iceberg::Result<Vec<(PartitionKey, RecordBatch)>> {
        let mut order: Vec<Struct> = Vec::new();
        let mut rows: HashMap<Struct, Vec<u32>> = HashMap::new();
        for (row, key) in self.partition_of_each_row(batch)?.into_iter().enumerate() {
            rows.entry(key.clone())
                .or_insert_with(|| {
                    order.push(key);
                    Vec::new()
                })
                .push(row as u32);
        }
        order
            .into_iter()
            .map(|key| {
                let indices = UInt32Array::from(rows.remove(&key).unwrap_or_default());
                let part = take_record_batch(batch, &indices)
                    .map_err(|e| Error::new(ErrorKind::DataInvalid, e.to_string()))?;
                let key = PartitionKey::new(self.spec.as_ref().clone(), self.schema.clone(), key);
                Ok((key, part))
            })
            .collect()
    }

    /// The partition value of each row of `batch`.
    pub(crate) fn partition_of_each_row(
        &self,
        batch: &RecordBatch,
    ) -> iceberg::Result<Vec<Struct>> {
        let values = self.with_days_floored(self.calculator.calculate(batch)?, batch)?;
        arrow_struct_to_literal(&values, self.calculator.partition_type())?
            .into_iter()
            .map(|literal| match literal {
                Some(Literal::Struct(key)) => Ok(key),
                _ => Err(Error::new(
                    ErrorKind::DataInvalid,
                    "Partition value is not a struct literal or is null",
                )),
            })
            .collect()
    }

    /// The partition values as JSON of the table's partition type (Iceberg's single-value
    /// serialization of a struct, as a manifest's partition is written in JSON).
    pub(crate) fn partition_json(&self, key: &Struct) -> iceberg::Result<String> {
        let partition_type = Type::Struct(self.calculator.partition_type().clone());
        Ok(Literal::Struct(key.clone())
            .try_into_json(&partition_type)?
            .to_string())
    }

    /// `values` (iceberg-rust's) with each timestamp `day` field recomputed by flooring.
    fn with_days_floored(
        &self,
        values: ArrayRef,
        batch: &RecordBatch,
    ) -> iceberg::Result<ArrayRef> {
        if self.days.is_empty() {
            return Ok(values);
        }
        let values = values.as_struct();
        let (fields, mut columns, nulls) = values.clone().into_parts();
        for (position, source) in &self.days {
            if let Some(column) = batch.column_by_name(source)
                && let Some(days) = days_since_epoch(column)
            {
                // The day's type in the partition struct (`date`).
                columns[*position] =
                    datafusion::arrow::compute::cast(&days, columns[*position].data_type())
                        .map_err(|e| Error::new(ErrorKind::DataInvalid, e.to_string()))?;
            }
        }
        let fixed = StructArray::try_new(fields, columns, nulls)
            .map_err(|e| Error::new(ErrorKind::DataInvalid, e.to_string()))?;
        Ok(Arc::new(fixed))
    }
}

/// The day (days since 1970-01-01, floored) of each timestamp in `column`; `None` for a
/// column that is not a timestamp.
pub(crate) fn days_since_epoch(column: &ArrayRef) -> Option<Int32Array> {
    let per_day: i64 = match column.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => 86_400,
        DataType::Timestamp(TimeUnit::Millisecond, _) => 86_400_000,
        DataType::Timestamp(TimeUnit::Microsecond, _) => 86_400_000_000,
        DataType::Timestamp(TimeUnit::Nanosecond, _) => 86_400_000_000_000,
        _ => return None,
    };
    let raw = datafusion::arrow::compute::cast(column, &DataType::Int64).ok()?;
    let raw = raw.as_primitive::<Int64Type>();
    Some(raw.unary(|v| v.div_euclid(per_day) as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    use datafusion::arrow::array::TimestampMicrosecondArray;
    use iceberg::spec::{NestedField, PartitionSpec, Schema};

    const DAY: i64 = 86_400_000_000;

    #[test]
    fn a_day_is_floored_before_1970_to_the_last_microsecond() {
        let column: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![
            Some(-DAY - 500_000), // 1969-12-30 23:59:59.5
            Some(-DAY),           // 1969-12-31 00:00:00
            Some(-1),             // 1969-12-31 23:59:59.999999
            Some(0),
            Some(DAY - 1),
            None,
        ]));
        let days = days_since_epoch(&column).unwrap();
        let got: Vec<Option<i32>> = days.iter().collect();
        assert_eq!(got, [Some(-2), Some(-1), Some(-1), Some(0), Some(0), None]);
        let text: ArrayRef = Arc::new(datafusion::arrow::array::StringArray::from(vec!["x"]));
        assert!(days_since_epoch(&text).is_none());
    }

    #[test]
    fn rows_are_split_by_their_floored_day_and_other_fields() {
        let schema = Arc::new(
            Schema::builder()
                .with_fields(vec![
                    NestedField::optional(1, "ts", Type::Primitive(PrimitiveType::Timestamp))
                        .into(),
                    NestedField::optional(2, "id", Type::Primitive(PrimitiveType::Long)).into(),
                ])
                .build()
                .unwrap(),
        );
        let spec = Arc::new(
            PartitionSpec::builder(schema.clone())
                .add_partition_field("ts", "ts_day", Transform::Day)
                .unwrap()
                .add_partition_field("id", "id_bucket", Transform::Identity)
                .unwrap()
                .build()
                .unwrap(),
        );
        let arrow = Arc::new(iceberg::arrow::schema_to_arrow_schema(&schema).unwrap());
        let batch = RecordBatch::try_new(
            arrow,
            vec![
                Arc::new(TimestampMicrosecondArray::from(vec![
                    -DAY - 500_000,
                    -DAY,
                    -DAY - 500_000,
                    0,
                ])),
                Arc::new(datafusion::arrow::array::Int64Array::from(vec![1, 1, 2, 1])),
            ],
        )
        .unwrap();
        let splitter = PartitionSplitter::try_new(schema, spec).unwrap();
        let parts = splitter.split(&batch).unwrap();
        let keys: Vec<(Option<Literal>, Option<Literal>, usize)> = parts
            .iter()
            .map(|(key, rows)| {
                let fields: Vec<_> = key.data().iter().map(|f| f.cloned()).collect();
                (fields[0].clone(), fields[1].clone(), rows.num_rows())
            })
            .collect();
        let date = |d: i32| Some(Literal::date(d));
        let long = |v: i64| Some(Literal::long(v));
        assert_eq!(
            keys,
            [
                (date(-2), long(1), 1),
                (date(-1), long(1), 1),
                (date(-2), long(2), 1),
                (date(0), long(1), 1),
            ]
        );
    }
}
