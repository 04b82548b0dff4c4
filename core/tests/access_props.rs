//! Property test of the location check: whatever encoding a location is written in
//! (`%2F`, `%2E%2E`, lower- or upper-case hex, double encoding, `//`, `/./`, unicode, a
//! `FILE://` scheme), the policy's decision is the decision for the path a reader opens, and
//! an admitted location is that path. The reference decodes and resolves with the standard
//! library's path components, not with the code under test. Runs in CI with a fixed number
//! of cases; `PROPTEST_CASES=100000` runs longer.

use std::path::{Component, Path, PathBuf};

use nightshift_core::access::{AccessPolicy, spec_text};
use proptest::prelude::*;

/// Below a directory that does not exist, so no symbolic link of this machine takes part.
const ROOT: &str = "/nightshift-prop-root";
const ALLOWED: &str = "/nightshift-prop-root/data/landing";

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("data".to_string()),
        Just("landing".to_string()),
        Just("secret".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just(String::new()),
        Just("ünïcödé x.csv".to_string()),
        Just("landing-private".to_string()),
        Just("日本".to_string()),
    ]
}

/// How one character is written in a URL.
#[derive(Debug, Clone, Copy)]
enum Spelling {
    Plain,
    Upper,
    Lower,
    Twice,
}

fn spelling() -> impl Strategy<Value = Spelling> {
    prop_oneof![
        4 => Just(Spelling::Plain),
        1 => Just(Spelling::Upper),
        1 => Just(Spelling::Lower),
        1 => Just(Spelling::Twice),
    ]
}

fn encode(text: &str, spellings: &[Spelling]) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        let spelling = spellings[i % spellings.len()];
        let mut bytes = [0u8; 4];
        let bytes = c.encode_utf8(&mut bytes).as_bytes();
        match spelling {
            // Characters a URL cannot hold as they are must be encoded anyway.
            Spelling::Plain if c.is_ascii_alphanumeric() || "/.-_".contains(c) => out.push(c),
            Spelling::Plain | Spelling::Upper => bytes
                .iter()
                .for_each(|b| out.push_str(&format!("%{b:02X}"))),
            Spelling::Lower => bytes
                .iter()
                .for_each(|b| out.push_str(&format!("%{b:02x}"))),
            Spelling::Twice => bytes
                .iter()
                .for_each(|b| out.push_str(&format!("%25{b:02X}"))),
        }
    }
    out
}

/// The reference reader: decode once (URLs only), then resolve with path components (`..` at
/// the root stays there, as the operating system has it). `None` when it cannot be read one
/// way (a `%` left after decoding).
fn reference(path: &str, decode: bool) -> Option<PathBuf> {
    let text = if decode {
        let decoded = percent_encoding::percent_decode_str(path)
            .decode_utf8()
            .ok()?
            .into_owned();
        if decoded.contains('%') {
            return None;
        }
        decoded
    } else {
        path.to_string()
    };
    let mut out = PathBuf::from("/");
    for component in Path::new(&text).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_decision_is_the_decision_for_the_path_a_reader_opens(
        segments in proptest::collection::vec(segment(), 0..8),
        spellings in proptest::collection::vec(spelling(), 1..6),
        form in 0..3u8,
    ) {
        let path = format!("{ROOT}/data/{}", segments.join("/"));
        let (text, decoded) = match form {
            0 => (path.clone(), false),
            1 => (format!("file:///{}", encode(&path[1..], &spellings)), true),
            _ => (format!("FILE:///{}", encode(&path[1..], &spellings)), true),
        };
        let policy = AccessPolicy::new(&[ALLOWED.to_string()], &[]).unwrap();
        let expected = reference(if decoded { &text[7..] } else { &text }, decoded);
        let decision = policy.admit_location("source `s` reads", &text);
        match (&expected, &decision) {
            (Some(opened), Ok(admitted)) => {
                prop_assert!(opened.starts_with(ALLOWED), "{text} admitted as {opened:?}");
                let admitted = PathBuf::from(spec_text(admitted));
                prop_assert_eq!(&admitted, opened, "{}", text);
            }
            (Some(opened), Err(e)) => {
                prop_assert!(!opened.starts_with(ALLOWED), "{text} ({opened:?}) refused: {e}");
            }
            (None, Ok(admitted)) => {
                prop_assert!(false, "{text} unreadable one way, admitted as {admitted:?}");
            }
            (None, Err(_)) => {}
        }
    }
}
