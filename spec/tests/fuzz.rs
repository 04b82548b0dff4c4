//! Bounded fuzzing of spec parsing: no input, however broken, makes the parser panic. Runs
//! in CI with a fixed number of cases; `PROPTEST_CASES=100000` runs longer.

use std::path::Path;

use proptest::prelude::*;

const VALID: &str = r#"[pipeline]
name = "daily_revenue"
description = "revenue per day"

[params]
start_date = "1995-03-01"

[[source]]
name = "orders"
format = "csv"
location = "data/orders/*.csv"
options = { delimiter = ";", header = "true" }
[source.schema]
o_orderkey = "bigint not null"
o_total = "decimal(12, 2)"
o_orderdate = "date"

[transform]
sql = "SELECT o_orderdate, SUM(o_total) AS revenue FROM orders WHERE o_orderdate >= DATE '${start_date}' GROUP BY 1"

[target]
table = "analytics.daily_revenue"
mode = "append"
partition_by = ["day(o_orderdate)", "bucket(16, o_orderkey)", "truncate(4, o_orderdate)"]

[execution]
shuffle_partitions = 4
"#;

fn parse(text: &str, params: &[(String, String)]) {
    // Errors are fine; panics are not. The base directory does not exist, so an `sql_file`
    // is never found.
    let _ = nightshift_spec::resolve_spec_text(
        text,
        Path::new("fuzz.toml"),
        Path::new("/nonexistent/fuzz"),
        params,
    );
}

/// A valid spec with `edits` random insertions, deletions and replacements of characters
/// that matter to TOML and to the spec's own small languages (types, transforms, params).
fn mutated() -> impl Strategy<Value = String> {
    let alphabet: Vec<char> =
        "[]{}=\"'.,#\n ${}()0123456789-_:abcdefghijklmnopqrstuvwxyz\\éλ😀\u{0}\t"
            .chars()
            .collect();
    let edit = (
        any::<prop::sample::Index>(),
        0..3u8,
        prop::sample::select(alphabet),
        0..8usize,
    );
    prop::collection::vec(edit, 1..12).prop_map(|edits| {
        let mut chars: Vec<char> = VALID.chars().collect();
        for (at, kind, c, len) in edits {
            let i = at.index(chars.len() + 1);
            match kind {
                0 => chars.insert(i, c),
                1 => {
                    let end = (i + len).min(chars.len());
                    chars.drain(i..end);
                }
                _ if i < chars.len() => chars[i] = c,
                _ => chars.push(c),
            }
        }
        chars.into_iter().collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        parse(&text, &[]);
    }

    #[test]
    fn mutated_specs_never_panic(text in mutated()) {
        parse(&text, &[]);
    }

    #[test]
    fn arbitrary_params_never_panic(
        key in "[a-z_${}]{0,12}",
        value in "\\PC{0,40}",
    ) {
        parse(VALID, &[(key, value)]);
    }
}

#[test]
fn the_base_spec_is_valid() {
    nightshift_spec::resolve_spec_text(
        VALID,
        Path::new("fuzz.toml"),
        Path::new("/nonexistent/fuzz"),
        &[],
    )
    .expect("the spec every mutation starts from parses");
}
