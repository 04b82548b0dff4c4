//! Parameters: `[params]` defaults, `--param k=v` overrides and `${k}` substitution.

use std::collections::BTreeMap;

use crate::error::SpecError;
use crate::suggest;

/// Spec defaults overridden by command-line values. An override must name a declared
/// parameter, so a typo in a scheduler's command line fails instead of being ignored.
pub(crate) fn effective_params(
    defaults: &BTreeMap<String, String>,
    overrides: &[(String, String)],
) -> Result<BTreeMap<String, String>, SpecError> {
    let mut params = defaults.clone();
    for (key, value) in overrides {
        if !defaults.contains_key(key) {
            return Err(SpecError::UnknownParam {
                name: key.clone(),
                context: "--param (declare it under [params] in the spec)".into(),
                hint: suggest::hint(key, defaults.keys().map(String::as_str)),
            });
        }
        params.insert(key.clone(), value.clone());
    }
    Ok(params)
}

/// The most bytes the texts of one spec may hold with their `${param}` references
/// substituted, all together: a large value used many times would otherwise grow a small
/// spec (a 1 MiB job submission) into gigabytes.
pub const MAX_SUBSTITUTED_BYTES: usize = 16 << 20;

/// Replaces every `${name}` in `text`; `$${` stands for a literal `${`. The result may hold
/// at most [`MAX_SUBSTITUTED_BYTES`].
pub fn substitute_params(
    text: &str,
    params: &BTreeMap<String, String>,
    context: &str,
) -> Result<String, SpecError> {
    substitute_within(text, params, context, &mut MAX_SUBSTITUTED_BYTES.clone())
}

/// [`substitute_params`] taking the result's bytes from `budget`, shared by the texts of
/// one spec.
pub(crate) fn substitute_within(
    text: &str,
    params: &BTreeMap<String, String>,
    context: &str,
    budget: &mut usize,
) -> Result<String, SpecError> {
    let too_large = || SpecError::TooLarge {
        context: context.to_string(),
        limit: MAX_SUBSTITUTED_BYTES,
    };
    let mut out = String::with_capacity(text.len().min(*budget));
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after.find('}').ok_or_else(|| SpecError::UnknownParam {
                name: after.chars().take(20).collect(),
                context: format!("{context} (missing closing `}}`)"),
                hint: String::new(),
            })?;
            let name = after[..end].trim();
            let value = params.get(name).ok_or_else(|| SpecError::UnknownParam {
                name: name.to_string(),
                context: context.to_string(),
                hint: suggest::hint(name, params.keys().map(String::as_str)),
            })?;
            if out.len() + value.len() > *budget {
                return Err(too_large());
            }
            out.push_str(value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    *budget = budget.checked_sub(out.len()).ok_or_else(too_large)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> BTreeMap<String, String> {
        [("run_date".to_string(), "2024-01-02".to_string())].into()
    }

    #[test]
    fn substitution_stops_at_the_size_limit_of_the_whole_spec() {
        let big: BTreeMap<String, String> = [("p".to_string(), "x".repeat(1 << 20))].into();
        let many = "${p}".repeat(17);
        let err = substitute_params(&many, &big, "[transform] sql").unwrap_err();
        assert!(
            err.to_string()
                .contains("[transform] sql grows past 16777216 bytes"),
            "{err}"
        );
        let mut budget = MAX_SUBSTITUTED_BYTES;
        for _ in 0..16 {
            assert!(substitute_within("${p}", &big, "option", &mut budget).is_ok());
        }
        assert!(substitute_within("${p}", &big, "option", &mut budget).is_err());
        assert_eq!(
            substitute_params(&"${p}".repeat(16), &big, "sql")
                .unwrap()
                .len(),
            16 << 20
        );
    }

    #[test]
    fn substitutes_and_escapes() {
        let out = substitute_params("d=${run_date} x=$${lit} $5", &params(), "sql").unwrap();
        assert_eq!(out, "d=2024-01-02 x=${lit} $5");
    }

    #[test]
    fn unknown_reference_suggests() {
        let err = substitute_params("${run_dat}", &params(), "sql").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown parameter `run_dat` in sql (did you mean `run_date`?)"
        );
    }

    #[test]
    fn override_must_be_declared() {
        let err = effective_params(&params(), &[("rundate".into(), "x".into())]).unwrap_err();
        assert!(err.to_string().contains("did you mean `run_date`"), "{err}");
        let ok = effective_params(&params(), &[("run_date".into(), "2025-01-01".into())]).unwrap();
        assert_eq!(ok["run_date"], "2025-01-01");
    }
}
