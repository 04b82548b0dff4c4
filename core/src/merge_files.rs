//! Which data files a merge rewrites: only those that may hold a row whose key the changes
//! hold. A file may hold one when, for every merge key column, the file's value range (its
//! manifest's lower and upper bounds) overlaps the changes' range of that key; a file is
//! left alone as soon as one key column's ranges are disjoint. A row whose key matches a
//! change has each key value inside both ranges, so no file left alone holds such a row.
//! A file without bounds for a key column, or with bounds of a type this cannot compare,
//! may hold anything and is rewritten.

use std::cmp::Ordering;
use std::collections::HashSet;

use datafusion::common::ScalarValue;
use iceberg::spec::{DataContentType, Datum, ManifestContentType, PrimitiveLiteral, PrimitiveType};
use iceberg::table::Table;

use crate::error::Result;
use crate::table::live::live_entries;

/// The changes' smallest and largest value of one key column.
pub type KeyRange = (ScalarValue, ScalarValue);

/// A bound from a manifest as a scalar DataFusion compares; `None` for a type it does not
/// convert (the file is then rewritten).
pub fn datum_scalar(datum: &Datum) -> Option<ScalarValue> {
    Some(match (datum.data_type(), datum.literal()) {
        (PrimitiveType::Int, PrimitiveLiteral::Int(v)) => ScalarValue::Int32(Some(*v)),
        (PrimitiveType::Long, PrimitiveLiteral::Long(v)) => ScalarValue::Int64(Some(*v)),
        (PrimitiveType::Float, PrimitiveLiteral::Float(v)) => ScalarValue::Float32(Some(v.0)),
        (PrimitiveType::Double, PrimitiveLiteral::Double(v)) => ScalarValue::Float64(Some(v.0)),
        (PrimitiveType::String, PrimitiveLiteral::String(v)) => ScalarValue::Utf8(Some(v.clone())),
        (PrimitiveType::Date, PrimitiveLiteral::Int(v)) => ScalarValue::Date32(Some(*v)),
        (PrimitiveType::Timestamp, PrimitiveLiteral::Long(v)) => {
            ScalarValue::TimestampMicrosecond(Some(*v), None)
        }
        (PrimitiveType::Timestamptz, PrimitiveLiteral::Long(v)) => {
            ScalarValue::TimestampMicrosecond(Some(*v), Some("+00:00".into()))
        }
        (PrimitiveType::Decimal { precision, scale }, PrimitiveLiteral::Int128(v)) => {
            ScalarValue::Decimal128(Some(*v), *precision as u8, *scale as i8)
        }
        _ => return None,
    })
}

/// `value` compared with `bound`, after converting `value` to the bound's type; `None`
/// when they cannot be compared.
fn compare(value: &ScalarValue, bound: &ScalarValue) -> Option<Ordering> {
    let value = value.cast_to(&bound.data_type()).ok()?;
    value.partial_cmp(bound)
}

/// Whether a file with `bounds` (per key column: its lower and upper bound, if known) may
/// hold a row whose key is in `changes` (per key column: the changes' min and max).
pub fn may_hold(
    bounds: &[(Option<ScalarValue>, Option<ScalarValue>)],
    changes: &[KeyRange],
) -> bool {
    bounds
        .iter()
        .zip(changes)
        .all(|((lower, upper), (min, max))| {
            // Iceberg's bounds leave NaN out: a file holding a NaN key may have any bounds.
            if is_nan(min) || is_nan(max) {
                return true;
            }
            // Disjoint when the file ends before the changes start, or starts after they end.
            let ends_before = upper
                .as_ref()
                .and_then(|upper| compare(min, upper))
                .is_some_and(|o| o == Ordering::Greater);
            let starts_after = lower
                .as_ref()
                .and_then(|lower| compare(max, lower))
                .is_some_and(|o| o == Ordering::Less);
            !(ends_before || starts_after)
        })
}

fn is_nan(value: &ScalarValue) -> bool {
    match value {
        ScalarValue::Float16(Some(v)) => v.is_nan(),
        ScalarValue::Float32(Some(v)) => v.is_nan(),
        ScalarValue::Float64(Some(v)) => v.is_nan(),
        _ => false,
    }
}

/// The live files of `table`'s current snapshot a merge must rewrite (see the module docs),
/// their bytes, and how many live data files there are. `changes` is `None` when the
/// changes hold no key: nothing matches.
pub async fn files_to_rewrite(
    table: &Table,
    keys: &[String],
    changes: Option<&[KeyRange]>,
) -> Result<(HashSet<String>, u64, usize)> {
    let mut chosen = HashSet::new();
    let mut bytes = 0;
    let mut live = 0;
    let metadata = table.metadata();
    let Some(snapshot) = metadata.current_snapshot() else {
        return Ok((chosen, bytes, live));
    };
    let schema = metadata.current_schema();
    let key_ids: Vec<Option<i32>> = keys
        .iter()
        .map(|k| schema.field_by_name(k).map(|f| f.id))
        .collect();
    for entry in live_entries(table, snapshot).await? {
        let file = entry.entry.data_file();
        if entry.content != ManifestContentType::Data
            || file.content_type() != DataContentType::Data
        {
            continue;
        }
        live += 1;
        let rewrite = match changes {
            None => false,
            Some(changes) => {
                let bounds: Vec<(Option<ScalarValue>, Option<ScalarValue>)> = key_ids
                    .iter()
                    .map(|id| {
                        let bound = |map: &std::collections::HashMap<i32, Datum>| {
                            id.and_then(|id| map.get(&id)).and_then(datum_scalar)
                        };
                        (bound(file.lower_bounds()), bound(file.upper_bounds()))
                    })
                    .collect();
                may_hold(&bounds, changes)
            }
        };
        if rewrite {
            bytes += file.file_size_in_bytes();
            chosen.insert(file.file_path().to_string());
        }
    }
    Ok((chosen, bytes, live))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(v: i64) -> ScalarValue {
        ScalarValue::Int64(Some(v))
    }

    #[test]
    fn a_file_is_rewritten_only_when_every_key_range_overlaps() {
        let file = |lo: i64, hi: i64| (Some(long(lo)), Some(long(hi)));
        let changes = [(long(5), long(25))];
        assert!(may_hold(&[file(1, 10)], &changes));
        assert!(may_hold(&[file(20, 30)], &changes));
        assert!(may_hold(&[file(25, 25)], &changes), "touching ends overlap");
        // A NaN key among the changes may be in any file: bounds leave NaN out.
        let double = |v: f64| Some(ScalarValue::Float64(Some(v)));
        let nan = ScalarValue::Float64(Some(f64::NAN));
        let doubles = (double(1.0), double(5.0));
        for changes in [
            [(nan.clone(), nan.clone())],
            [(ScalarValue::Float64(Some(7.0)), nan.clone())],
        ] {
            assert!(may_hold(std::slice::from_ref(&doubles), &changes));
        }
        let far = [(
            ScalarValue::Float64(Some(7.0)),
            ScalarValue::Float64(Some(9.0)),
        )];
        assert!(!may_hold(&[doubles], &far));
        assert!(!may_hold(&[file(26, 40)], &changes));
        assert!(!may_hold(&[file(1, 4)], &changes));
        // Two keys: disjoint on either one is enough to leave the file alone.
        let two = [(long(5), long(25)), (long(100), long(200))];
        assert!(may_hold(&[file(1, 10), file(150, 160)], &two));
        assert!(!may_hold(&[file(1, 10), file(300, 400)], &two));
        // Unknown bounds may hold anything.
        assert!(may_hold(&[(None, Some(long(3)))], &[(long(1), long(2))]));
        assert!(may_hold(&[(None, None)], &changes));
    }

    #[test]
    fn changes_of_another_type_are_compared_in_the_bounds_type() {
        // An int key in the changes against long bounds; a string against strings.
        let changes = [(ScalarValue::Int32(Some(7)), ScalarValue::Int32(Some(9)))];
        assert!(may_hold(&[(Some(long(8)), Some(long(8)))], &changes));
        assert!(!may_hold(&[(Some(long(10)), Some(long(12)))], &changes));
        let text = |s: &str| ScalarValue::Utf8(Some(s.into()));
        let changes = [(text("m"), text("p"))];
        assert!(!may_hold(&[(Some(text("a")), Some(text("l")))], &changes));
        assert!(may_hold(&[(Some(text("a")), Some(text("mz")))], &changes));
    }

    #[test]
    fn manifest_bounds_convert() {
        assert_eq!(datum_scalar(&Datum::long(3)), Some(long(3)));
        assert_eq!(
            datum_scalar(&Datum::string("ü")),
            Some(ScalarValue::Utf8(Some("ü".into())))
        );
        assert_eq!(
            datum_scalar(&Datum::date(19_000)),
            Some(ScalarValue::Date32(Some(19_000)))
        );
        assert_eq!(datum_scalar(&Datum::bool(true)), None);
    }
}
