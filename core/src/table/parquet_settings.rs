//! Parquet writer settings from the table's Iceberg `write.parquet.*` properties, the keys
//! Spark, Flink and PyIceberg read, so a table written by several engines keeps one codec and
//! one layout. The coordinator validates them once when it plans the final stage; workers
//! build their writer from the same map.

use std::collections::{BTreeMap, HashMap};

use parquet::basic::{BrotliLevel, Compression, GzipLevel, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

/// The prefix of the table properties the Parquet writer reads.
pub const PARQUET_PREFIX: &str = "write.parquet.";

const CODEC: &str = "write.parquet.compression-codec";
const LEVEL: &str = "write.parquet.compression-level";
const DICT_SIZE: &str = "write.parquet.dict-size-bytes";
const PAGE_SIZE: &str = "write.parquet.page-size-bytes";
const PAGE_ROWS: &str = "write.parquet.page-row-limit";
const ROW_GROUP_SIZE: &str = "write.parquet.row-group-size-bytes";
const BLOOM_ENABLED: &str = "write.parquet.bloom-filter-enabled.column.";
const BLOOM_FPP: &str = "write.parquet.bloom-filter-fpp.column.";

/// ZSTD level when the table names none. Iceberg's default codec is zstd; level 1 writes
/// about as fast as snappy and smaller.
const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Dictionary page size limit when the table names none (`write.parquet.dict-size-bytes`).
/// Smaller than parquet-rs's 1 MiB and Iceberg Java's 2 MiB: a column whose distinct values
/// pass it falls back to plain encoding sooner, so less time goes into interning values a
/// dictionary will not hold. On TPC-H SF1's 15-column wide fact this wrote 22 % faster and
/// 3 % smaller (zstd compresses the plain pages well); see load-tests/README.md.
pub const DEFAULT_DICT_SIZE_BYTES: usize = 128 << 10;

/// The table properties that configure the Parquet writer (others are for other writers).
pub fn parquet_properties(table: &HashMap<String, String>) -> BTreeMap<String, String> {
    table
        .iter()
        .filter(|(key, _)| key.starts_with(PARQUET_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The writer settings the properties ask for; unset keys keep Iceberg's and parquet-rs's
/// defaults. The error names the property and the value it cannot use. Keys this writer has
/// no setting for (e.g. `write.parquet.bloom-filter-max-bytes`) are left to other engines.
pub fn writer_properties<'a>(
    properties: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<WriterProperties, String> {
    let properties: BTreeMap<&str, &str> = properties
        .into_iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut builder = WriterProperties::builder()
        .set_compression(compression(
            properties.get(CODEC).copied(),
            properties.get(LEVEL).copied(),
        )?)
        .set_dictionary_page_size_limit(DEFAULT_DICT_SIZE_BYTES);
    for (&key, &value) in &properties {
        builder = match key {
            DICT_SIZE => builder.set_dictionary_page_size_limit(bytes(key, value)?),
            PAGE_SIZE => builder.set_data_page_size_limit(bytes(key, value)?),
            PAGE_ROWS => builder.set_data_page_row_count_limit(bytes(key, value)?),
            ROW_GROUP_SIZE => builder.set_max_row_group_bytes(Some(bytes(key, value)?)),
            _ => {
                if let Some(column) = key.strip_prefix(BLOOM_ENABLED) {
                    let enabled = value
                        .parse::<bool>()
                        .map_err(|_| invalid(key, value, "expected true or false"))?;
                    builder.set_column_bloom_filter_enabled(column_path(column), enabled)
                } else if let Some(column) = key.strip_prefix(BLOOM_FPP) {
                    let fpp = value
                        .parse::<f64>()
                        .ok()
                        .filter(|p| *p > 0.0 && *p < 1.0)
                        .ok_or_else(|| {
                            invalid(key, value, "expected a probability between 0 and 1")
                        })?;
                    builder.set_column_bloom_filter_fpp(column_path(column), fpp)
                } else {
                    builder
                }
            }
        };
    }
    Ok(builder.build())
}

/// The codec `write.parquet.compression-codec` and `-level` name (zstd when unset).
fn compression(codec: Option<&str>, level: Option<&str>) -> Result<Compression, String> {
    let raw_level = level.unwrap_or_default();
    let level = level
        .map(|l| {
            l.trim()
                .parse::<i32>()
                .map_err(|_| invalid(LEVEL, l, "expected an integer"))
        })
        .transpose()?;
    let codec = codec.unwrap_or("zstd");
    let without_level = |c: Compression| match level {
        Some(_) => Err(invalid(
            LEVEL,
            raw_level,
            &format!("codec `{codec}` takes no level"),
        )),
        None => Ok(c),
    };
    let bad_level = |e: parquet::errors::ParquetError| invalid(LEVEL, raw_level, &e.to_string());
    let unsigned = |l: i32| u32::try_from(l).map_err(|_| invalid(LEVEL, raw_level, "negative"));
    match codec.trim().to_ascii_lowercase().as_str() {
        "zstd" => Ok(Compression::ZSTD(
            ZstdLevel::try_new(level.unwrap_or(DEFAULT_ZSTD_LEVEL)).map_err(bad_level)?,
        )),
        "gzip" => Ok(Compression::GZIP(match level {
            Some(l) => GzipLevel::try_new(unsigned(l)?).map_err(bad_level)?,
            None => GzipLevel::default(),
        })),
        "brotli" => Ok(Compression::BROTLI(match level {
            Some(l) => BrotliLevel::try_new(unsigned(l)?).map_err(bad_level)?,
            None => BrotliLevel::default(),
        })),
        "snappy" => without_level(Compression::SNAPPY),
        // Iceberg's `lz4`: parquet-rs writes the LZ4_RAW codec readers now expect.
        "lz4" | "lz4_raw" => without_level(Compression::LZ4_RAW),
        "uncompressed" | "none" => without_level(Compression::UNCOMPRESSED),
        _ => Err(invalid(
            CODEC,
            codec,
            "expected zstd, snappy, gzip, lz4, brotli or uncompressed",
        )),
    }
}

fn bytes(key: &str, value: &str) -> Result<usize, String> {
    value
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| invalid(key, value, "expected a positive whole number"))
}

fn column_path(column: &str) -> ColumnPath {
    ColumnPath::new(column.split('.').map(str::to_string).collect())
}

fn invalid(key: &str, value: &str, why: &str) -> String {
    format!("table property `{key}` = `{value}`: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn build(pairs: &[(&str, &str)]) -> Result<WriterProperties, String> {
        writer_properties(&props(pairs))
    }

    #[test]
    fn zstd_level_one_and_a_small_dictionary_when_the_table_names_nothing() {
        let p = build(&[]).unwrap();
        assert_eq!(
            p.compression(&ColumnPath::from("any")),
            Compression::ZSTD(ZstdLevel::try_new(1).unwrap())
        );
        assert_eq!(p.dictionary_page_size_limit(), DEFAULT_DICT_SIZE_BYTES);
    }

    #[test]
    fn codec_and_level_follow_the_table() {
        let p = build(&[(CODEC, "ZSTD"), (LEVEL, "9")]).unwrap();
        assert_eq!(
            p.compression(&ColumnPath::from("a")),
            Compression::ZSTD(ZstdLevel::try_new(9).unwrap())
        );
        let p = build(&[(CODEC, "snappy")]).unwrap();
        assert_eq!(p.compression(&ColumnPath::from("a")), Compression::SNAPPY);
        let p = build(&[(CODEC, "lz4")]).unwrap();
        assert_eq!(p.compression(&ColumnPath::from("a")), Compression::LZ4_RAW);
        let p = build(&[(CODEC, "gzip"), (LEVEL, "2")]).unwrap();
        assert_eq!(
            p.compression(&ColumnPath::from("a")),
            Compression::GZIP(GzipLevel::try_new(2).unwrap())
        );
    }

    #[test]
    fn sizes_and_bloom_filters_follow_the_table() {
        let p = build(&[
            (DICT_SIZE, "4096"),
            (PAGE_SIZE, "65536"),
            (PAGE_ROWS, "5000"),
            (ROW_GROUP_SIZE, "134217728"),
            (
                "write.parquet.bloom-filter-enabled.column.customer_id",
                "true",
            ),
            ("write.parquet.bloom-filter-fpp.column.customer_id", "0.01"),
        ])
        .unwrap();
        let column = ColumnPath::from("customer_id");
        assert_eq!(p.dictionary_page_size_limit(), 4096);
        assert_eq!(p.data_page_size_limit(), 65536);
        assert_eq!(p.data_page_row_count_limit(), 5000);
        assert_eq!(p.max_row_group_bytes(), Some(134217728));
        let bloom = p.bloom_filter_properties(&column).expect("bloom filter on");
        assert_eq!(bloom.fpp, 0.01);
        assert!(
            p.bloom_filter_properties(&ColumnPath::from("other"))
                .is_none()
        );
    }

    #[test]
    fn bad_values_name_the_property() {
        for (pairs, names) in [
            (vec![(CODEC, "zip")], CODEC),
            (vec![(CODEC, "zstd"), (LEVEL, "fast")], LEVEL),
            (vec![(CODEC, "zstd"), (LEVEL, "99")], LEVEL),
            (vec![(CODEC, "snappy"), (LEVEL, "3")], LEVEL),
            (vec![(PAGE_SIZE, "-1")], PAGE_SIZE),
            (vec![(DICT_SIZE, "0")], DICT_SIZE),
            (
                vec![("write.parquet.bloom-filter-fpp.column.x", "2")],
                "bloom-filter-fpp.column.x",
            ),
        ] {
            let err = build(&pairs).unwrap_err();
            assert!(err.contains(names), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn only_parquet_keys_travel_and_unknown_ones_are_left_alone() {
        let table = props(&[
            (CODEC, "snappy"),
            ("write.target-file-size-bytes", "1"),
            ("write.parquet.bloom-filter-max-bytes", "1048576"),
        ]);
        let kept = parquet_properties(&table);
        assert_eq!(
            kept.keys().collect::<Vec<_>>(),
            [
                "write.parquet.bloom-filter-max-bytes",
                "write.parquet.compression-codec"
            ]
        );
        assert!(writer_properties(&kept).is_ok());
    }
}
