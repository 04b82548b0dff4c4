//! Partition transforms of the target table: `day(ts)`, `identity(region)`, `bucket(16, id)`.

use crate::error::SpecError;

/// An Iceberg partition transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionTransform {
    Identity,
    Year,
    Month,
    Day,
    Hour,
    Bucket(u32),
    Truncate(u32),
}

/// One `partition_by` entry: a transform applied to a source column of the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionField {
    pub column: String,
    pub transform: PartitionTransform,
}

impl PartitionField {
    /// The partition field name, as Iceberg's Java library names it (`ts_day`, `id_bucket`).
    /// The partition field's name: the column, with the transform's suffix, made a valid
    /// Avro name ([`avro_compatible_name`]): manifests store partition values in an Avro
    /// record whose fields these names are, and an invalid one (`Région`, `1region`) wrote
    /// manifests no reader, iceberg-rust included, could read again.
    pub fn field_name(&self) -> String {
        avro_compatible_name(&self.plain_field_name())
    }

    fn plain_field_name(&self) -> String {
        let suffix = match self.transform {
            PartitionTransform::Identity => return self.column.clone(),
            PartitionTransform::Year => "year",
            PartitionTransform::Month => "month",
            PartitionTransform::Day => "day",
            PartitionTransform::Hour => "hour",
            PartitionTransform::Bucket(_) => "bucket",
            PartitionTransform::Truncate(_) => "trunc",
        };
        format!("{}_{suffix}", self.column)
    }
}

/// `name` as Iceberg's Java `AvroSchemaUtil.makeCompatibleName` makes it a valid Avro name
/// (`[A-Za-z_][A-Za-z0-9_]*`): a leading digit `d` becomes `_d`, any other character that
/// does not fit `_x` and its code point in upper-case hex (`Région` → `R_xE9gion`). Valid
/// names stay as they are. Unlike Java, letters outside ASCII are replaced too: Avro's
/// names are ASCII, and the Rust Avro library refuses others.
pub fn avro_compatible_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, c) in name.chars().enumerate() {
        if crate::model::identifier_char(c, i == 0) {
            out.push(c);
        } else if c.is_ascii_digit() {
            out.push('_');
            out.push(c);
        } else {
            out.push_str(&format!("_x{:X}", c as u32));
        }
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

const KNOWN: &str = "identity(col), year(col), month(col), day(col), hour(col), \
                     bucket(N, col), truncate(W, col)";

pub(crate) fn parse_partition_field(entry: &str) -> Result<PartitionField, SpecError> {
    let err = |message: String| SpecError::Partition {
        entry: entry.to_string(),
        message,
    };
    let text = entry.trim();
    let Some(open) = text.find('(') else {
        return if is_column(text) {
            Ok(PartitionField {
                column: text.to_string(),
                transform: PartitionTransform::Identity,
            })
        } else {
            Err(err(format!("expected one of {KNOWN}")))
        };
    };
    let name = text[..open].trim().to_ascii_lowercase();
    let args = text[open + 1..]
        .strip_suffix(')')
        .ok_or_else(|| err("missing closing `)`".into()))?;
    let args: Vec<&str> = args.split(',').map(str::trim).collect();
    let one_column = |args: &[&str]| match args {
        [col] if is_column(col) => Ok(col.to_string()),
        _ => Err(err(format!("`{name}` takes one column name"))),
    };
    let width_and_column = |args: &[&str]| match args {
        [n, col] if is_column(col) => n
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .map(|n| (n, col.to_string()))
            .ok_or_else(|| err(format!("`{name}` needs a positive whole number, got `{n}`"))),
        _ => Err(err(format!("`{name}` takes (N, column)"))),
    };
    let (transform, column) = match name.as_str() {
        "identity" => (PartitionTransform::Identity, one_column(&args)?),
        "year" | "years" => (PartitionTransform::Year, one_column(&args)?),
        "month" | "months" => (PartitionTransform::Month, one_column(&args)?),
        "day" | "days" => (PartitionTransform::Day, one_column(&args)?),
        "hour" | "hours" => (PartitionTransform::Hour, one_column(&args)?),
        "bucket" => {
            let (n, col) = width_and_column(&args)?;
            (PartitionTransform::Bucket(n), col)
        }
        "truncate" => {
            let (n, col) = width_and_column(&args)?;
            (PartitionTransform::Truncate(n), col)
        }
        other => {
            return Err(err(format!(
                "unknown transform `{other}`; expected one of {KNOWN}"
            )));
        }
    };
    Ok(PartitionField { column, transform })
}

/// Refuses two entries Iceberg would refuse only when the table is created (as a failure
/// while running): the same field twice, or two time transforms (year, month, day, hour) of
/// one column, which are redundant (`day(ts)` and `hour(ts)`: the hour names the day).
pub(crate) fn check_not_redundant(
    fields: &[PartitionField],
    entries: &[String],
) -> Result<(), SpecError> {
    let is_time = |t: PartitionTransform| {
        matches!(
            t,
            PartitionTransform::Year
                | PartitionTransform::Month
                | PartitionTransform::Day
                | PartitionTransform::Hour
        )
    };
    for (i, a) in fields.iter().enumerate() {
        for (j, b) in fields.iter().enumerate().skip(i + 1) {
            let redundant = a.column == b.column
                && (a.field_name() == b.field_name()
                    || (is_time(a.transform) && is_time(b.transform)));
            if redundant {
                return Err(SpecError::Partition {
                    entry: entries[j].clone(),
                    message: format!(
                        "redundant with `{}`: a column takes one time transform (year, month, day or hour) and no entry twice",
                        entries[i]
                    ),
                });
            }
        }
    }
    Ok(())
}

fn is_column(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_field_names_are_valid_avro_names_as_icebergs_java_makes_them() {
        for (name, avro) in [
            ("region", "region"),
            ("order_date_day", "order_date_day"),
            ("_x", "_x"),
            ("Région", "R_xE9gion"),
            ("1region", "_1region"),
            ("Date Jour_month", "Date_x20Jour_month"),
            ("a-b", "a_x2Db"),
            ("", "_"),
        ] {
            assert_eq!(avro_compatible_name(name), avro, "{name}");
        }
        let field = |entry: &str| parse_partition_field(entry).unwrap().field_name();
        assert_eq!(field("identity(Région)"), "R_xE9gion");
        assert_eq!(field("month(1day)"), "_1day_month");
        assert_eq!(field("day(order_date)"), "order_date_day");
    }

    #[test]
    fn parses_transforms() {
        let f = parse_partition_field("day(order_ts)").unwrap();
        assert_eq!(f.transform, PartitionTransform::Day);
        assert_eq!(f.field_name(), "order_ts_day");
        let f = parse_partition_field("bucket(16, id)").unwrap();
        assert_eq!(f.transform, PartitionTransform::Bucket(16));
        assert_eq!(
            parse_partition_field("region").unwrap().field_name(),
            "region"
        );
    }

    #[test]
    fn refuses_redundant_entries_by_name() {
        let check = |entries: &[&str]| {
            let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
            let fields: Vec<_> = entries
                .iter()
                .map(|e| parse_partition_field(e).unwrap())
                .collect();
            check_not_redundant(&fields, &entries).map_err(|e| e.to_string())
        };
        let err = check(&["day(ts)", "hour(ts)"]).unwrap_err();
        assert!(
            err.contains("hour(ts)") && err.contains("redundant with `day(ts)`"),
            "{err}"
        );
        assert!(check(&["region", "identity(region)"]).is_err());
        assert!(check(&["day(ts)", "bucket(4, ts)", "month(created)", "region"]).is_ok());
    }

    #[test]
    fn rejects_unknown_transform() {
        let err = parse_partition_field("weekday(ts)")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown transform `weekday`"), "{err}");
        let err = parse_partition_field("bucket(x, id)")
            .unwrap_err()
            .to_string();
        assert!(err.contains("positive whole number"), "{err}");
    }
}
