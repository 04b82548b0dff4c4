//! Mapping a query's Arrow result schema to an Iceberg table schema.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, TimeUnit};

use crate::error::{CoreError, Result};

/// The Iceberg schema a table gets when it is created from a result schema. Every column is
/// optional: DataFusion's nullability inference is not a contract.
pub fn iceberg_schema_for(table: &str, result: &Schema) -> Result<iceberg::spec::Schema> {
    let fields = result
        .fields()
        .iter()
        .map(|f| normalize_field(table, f))
        .collect::<Result<Vec<_>>>()?;
    let schema = Schema::new(fields);
    iceberg::arrow::arrow_schema_to_schema_auto_assign_ids(&schema).map_err(|e| CoreError::Target {
        table: table.to_string(),
        message: format!("cannot map the result schema to Iceberg: {e}"),
    })
}

fn normalize_field(table: &str, field: &Arc<Field>) -> Result<Field> {
    let data_type = normalize_type(table, field.name(), field.data_type())?;
    Ok(Field::new(field.name(), data_type, true))
}

/// The Arrow type Iceberg stores for `data_type`: strings and binaries lose their view /
/// large encodings, timestamps become microseconds, small and unsigned integers widen.
fn normalize_type(table: &str, column: &str, data_type: &DataType) -> Result<DataType> {
    let unsupported = |why: &str| CoreError::Target {
        table: table.to_string(),
        message: format!("column `{column}` has type {data_type}, {why}"),
    };
    Ok(match data_type {
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::Binary | DataType::BinaryView | DataType::LargeBinary => DataType::LargeBinary,
        DataType::Boolean => DataType::Boolean,
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::UInt8 | DataType::UInt16 => {
            DataType::Int32
        }
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => DataType::Int64,
        DataType::Float16 | DataType::Float32 => DataType::Float32,
        DataType::Float64 => DataType::Float64,
        DataType::Decimal128(p, s) => DataType::Decimal128(*p, *s),
        DataType::Decimal256(p, s) if *p <= 38 => DataType::Decimal128(*p, *s),
        DataType::Date32 | DataType::Date64 => DataType::Date32,
        DataType::Time32(_) | DataType::Time64(_) => DataType::Time64(TimeUnit::Microsecond),
        DataType::Timestamp(_, None) => DataType::Timestamp(TimeUnit::Microsecond, None),
        DataType::Timestamp(_, Some(_)) => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into()))
        }
        DataType::Dictionary(_, value) => normalize_type(table, column, value)?,
        DataType::List(item) | DataType::LargeList(item) => {
            DataType::List(Arc::new(normalize_field(table, item)?))
        }
        DataType::Struct(fields) => DataType::Struct(Fields::from(
            fields
                .iter()
                .map(|f| normalize_field(table, f))
                .collect::<Result<Vec<_>>>()?,
        )),
        DataType::Null => {
            return Err(unsupported(
                "it is always NULL; give it a type in the SQL, e.g. CAST(NULL AS VARCHAR)",
            ));
        }
        _ => {
            return Err(unsupported(
                "which Iceberg cannot store; CAST it in the SQL",
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_common_types() {
        let result = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8View, true),
            Field::new("amount", DataType::Decimal128(12, 2), true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                true,
            ),
        ]);
        let schema = iceberg_schema_for("ns.t", &result).unwrap();
        let names: Vec<_> = schema
            .as_struct()
            .fields()
            .iter()
            .map(|f| f.name.clone())
            .collect();
        assert_eq!(names, ["id", "name", "amount", "ts"]);
        assert!(schema.as_struct().fields().iter().all(|f| !f.required));
    }

    #[test]
    fn rejects_untyped_null() {
        let result = Schema::new(vec![Field::new("x", DataType::Null, true)]);
        let err = iceberg_schema_for("ns.t", &result).unwrap_err().to_string();
        assert!(err.contains("column `x`"), "{err}");
        assert!(err.contains("CAST(NULL"), "{err}");
    }
}
