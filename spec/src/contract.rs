//! Schema contracts: `[source.schema] col = "bigint not null"` parsed into Arrow types.

use std::collections::BTreeMap;

use arrow_schema::{DataType, TimeUnit};

use crate::error::SpecError;

/// One column of a source's schema contract.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnContract {
    pub name: String,
    pub data_type: DataType,
    pub nullable: bool,
    /// The type as written in the spec, for messages.
    pub declared: String,
}

pub(crate) fn parse_contract(
    source: &str,
    schema: &BTreeMap<String, String>,
) -> Result<Vec<ColumnContract>, SpecError> {
    schema
        .iter()
        .map(|(column, declared)| {
            let (data_type, nullable) =
                parse_column_type(declared).map_err(|message| SpecError::Contract {
                    source_name: source.to_string(),
                    column: column.clone(),
                    message,
                })?;
            Ok(ColumnContract {
                name: column.clone(),
                data_type,
                nullable,
                declared: declared.clone(),
            })
        })
        .collect()
}

/// Parses `"bigint not null"`, `"decimal(12, 2)"`, `"timestamptz"`, ... into a type and
/// nullability.
pub fn parse_column_type(declared: &str) -> Result<(DataType, bool), String> {
    let lower = declared.trim().to_ascii_lowercase();
    let (ty, nullable) = match lower.strip_suffix("not null") {
        Some(ty) => (ty.trim(), false),
        None => (lower.strip_suffix(" null").unwrap_or(&lower).trim(), true),
    };
    let data_type = match ty {
        "tinyint" | "int8" => DataType::Int8,
        "smallint" | "int16" => DataType::Int16,
        "int" | "integer" | "int32" => DataType::Int32,
        "bigint" | "long" | "int64" => DataType::Int64,
        "float" | "real" | "float32" => DataType::Float32,
        "double" | "float64" | "double precision" => DataType::Float64,
        "boolean" | "bool" => DataType::Boolean,
        "string" | "varchar" | "text" | "utf8" => DataType::Utf8,
        "binary" | "bytea" | "varbinary" => DataType::Binary,
        "date" => DataType::Date32,
        "timestamp" | "timestamp without time zone" => {
            DataType::Timestamp(TimeUnit::Microsecond, None)
        }
        "timestamptz" | "timestamp with time zone" => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        }
        other => parse_decimal(other).ok_or_else(|| {
            format!(
                "unknown type `{declared}`; use one of tinyint, smallint, int, bigint, float, \
                 double, decimal(p, s), boolean, string, binary, date, timestamp, timestamptz, \
                 optionally followed by `not null`"
            )
        })?,
    };
    Ok((data_type, nullable))
}

fn parse_decimal(ty: &str) -> Option<DataType> {
    let args = ty
        .strip_prefix("decimal")
        .or_else(|| ty.strip_prefix("numeric"))?
        .trim()
        .strip_prefix('(')?
        .strip_suffix(')')?;
    let (p, s) = args.split_once(',')?;
    let (p, s): (u8, i8) = (p.trim().parse().ok()?, s.trim().parse().ok()?);
    (1..=38).contains(&p).then_some(DataType::Decimal128(p, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_types_and_nullability() {
        assert_eq!(
            parse_column_type("bigint not null"),
            Ok((DataType::Int64, false))
        );
        assert_eq!(parse_column_type("STRING"), Ok((DataType::Utf8, true)));
        assert_eq!(
            parse_column_type("decimal(12, 2) not null"),
            Ok((DataType::Decimal128(12, 2), false))
        );
        assert!(matches!(
            parse_column_type("timestamptz"),
            Ok((DataType::Timestamp(TimeUnit::Microsecond, Some(_)), true))
        ));
    }

    #[test]
    fn unknown_type_lists_choices() {
        let err = parse_column_type("bigbigint").unwrap_err();
        assert!(err.contains("unknown type `bigbigint`"), "{err}");
        assert!(err.contains("decimal(p, s)"), "{err}");
    }
}
