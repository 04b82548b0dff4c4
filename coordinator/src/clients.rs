//! Who calls the job API, as its bearer token says, and which jobs that caller may see.
//!
//! A token is configured with a client name or without one (`tokens_file` lines, or the
//! comma-separated `NIGHTSHIFT_API_TOKENS`):
//!
//! ```text
//! tok-shared-1            # no name: the shared namespace every unnamed token is in
//! etl-eu   tok-eu-1       # client `etl-eu`: its own jobs and idempotency keys only
//! ops      tok-ops-1  operator   # an operator: sees and cancels every client's jobs
//! ```
//!
//! A job records the client that submitted it (none for the shared namespace). A caller sees
//! (gets, watches, lists, cancels, reads the report of) only the jobs [`Caller::may_see`]
//! allows; any other job is answered as if it did not exist. A named client's idempotency
//! keys are its own: two clients sending the same key make two jobs. Job ids stay one
//! namespace (an Iceberg table knows the jobs it committed by id), so a chosen id another
//! client's job holds is refused without saying anything about that job.

use std::collections::{HashMap, HashSet};

use nightshift_cluster::redis_state::OWNER_FIELD;

/// The caller of a job API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A token without a client name, or an API served without authentication: one
    /// namespace, as every token was before tokens had names.
    Shared,
    /// A named client's token: its own jobs only.
    Client(String),
    /// An operator's token: every job; the jobs it submits are its own.
    Operator(String),
}

impl Caller {
    /// What a job this caller submits records as its owner (`None`: the shared namespace).
    pub fn owner(&self) -> Option<&str> {
        match self {
            Caller::Shared => None,
            Caller::Client(name) | Caller::Operator(name) => Some(name),
        }
    }

    /// Whether this caller may see a job whose record names `owner` (`None`: a job of the
    /// shared namespace, or a record written before jobs had owners).
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        match self {
            Caller::Operator(_) => true,
            Caller::Shared => owner.is_none(),
            Caller::Client(name) => owner == Some(name.as_str()),
        }
    }

    /// Whether `record` (a job's Redis record, empty when there is none) is a job this
    /// caller may see.
    pub fn may_see_record(&self, record: &HashMap<String, String>) -> bool {
        !record.is_empty() && self.may_see(record.get(OWNER_FIELD).map(String::as_str))
    }
}

/// A configured bearer token and the caller it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub secret: String,
    pub caller: Caller,
}

/// Why the configured tokens cannot be used. The messages never quote a token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("{at}: a client name is letters, digits, `.`, `_` or `-` (at most 64), not `{name}`")]
    BadName { at: String, name: String },
    #[error("{at}: the third word may only be `operator`")]
    BadRole { at: String },
    #[error("{at}: a token entry is `TOKEN`, `CLIENT TOKEN` or `CLIENT TOKEN operator`")]
    TooManyWords { at: String },
    #[error("{at}: this token is configured twice")]
    Repeated { at: String },
    #[error("{at}: a token is printable ASCII (it travels in an HTTP header), not this one")]
    NotAscii { at: String },
}

/// The token an entry configures (`None` for a blank entry or a `#` comment): `TOKEN`,
/// `CLIENT TOKEN` or `CLIENT TOKEN operator`, words separated by spaces or tabs. `at` says
/// where the entry is, for errors.
pub fn parse_token_entry(entry: &str, at: &str) -> Result<Option<Token>, TokenError> {
    let entry = entry.trim();
    if entry.is_empty() || entry.starts_with('#') {
        return Ok(None);
    }
    let words: Vec<&str> = entry.split_whitespace().collect();
    let named = |name: &str| -> Result<String, TokenError> {
        if is_client_name(name) {
            Ok(name.to_string())
        } else {
            Err(TokenError::BadName {
                at: at.to_string(),
                name: name.to_string(),
            })
        }
    };
    let (secret, caller) = match words.as_slice() {
        [secret] => (*secret, Caller::Shared),
        [name, secret] => (*secret, Caller::Client(named(name)?)),
        [name, secret, "operator"] => (*secret, Caller::Operator(named(name)?)),
        [_, _, _] => return Err(TokenError::BadRole { at: at.to_string() }),
        _ => return Err(TokenError::TooManyWords { at: at.to_string() }),
    };
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotAscii { at: at.to_string() });
    }
    Ok(Some(Token {
        secret: secret.to_string(),
        caller,
    }))
}

/// The tokens of `NIGHTSHIFT_API_TOKENS` (entries separated by commas) and of a tokens file
/// (one entry per line), in that order; a token configured twice is refused.
pub fn configured_tokens(env: &str, file: Option<(&str, &str)>) -> Result<Vec<Token>, TokenError> {
    let mut tokens = Vec::new();
    for (i, entry) in env.split(',').enumerate() {
        let at = format!("NIGHTSHIFT_API_TOKENS entry {}", i + 1);
        tokens.extend(parse_token_entry(entry, &at)?.map(|t| (at, t)));
    }
    if let Some((path, text)) = file {
        for (i, line) in text.lines().enumerate() {
            let at = format!("{path} line {}", i + 1);
            tokens.extend(parse_token_entry(line, &at)?.map(|t| (at, t)));
        }
    }
    let mut seen = HashSet::new();
    for (at, token) in &tokens {
        if !seen.insert(token.secret.as_str()) {
            return Err(TokenError::Repeated { at: at.clone() });
        }
    }
    Ok(tokens.into_iter().map(|(_, t)| t).collect())
}

fn is_client_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str) -> Caller {
        Caller::Client(name.into())
    }

    #[test]
    fn a_client_sees_its_own_jobs_the_shared_namespace_its_own_an_operator_all() {
        let alice = client("alice");
        assert!(alice.may_see(Some("alice")));
        assert!(!alice.may_see(Some("bob")));
        assert!(!alice.may_see(None));
        // A name that only shares a prefix is another client.
        assert!(!alice.may_see(Some("alice2")));
        assert!(!client("alice2").may_see(Some("alice")));
        assert!(Caller::Shared.may_see(None));
        assert!(!Caller::Shared.may_see(Some("alice")));
        let ops = Caller::Operator("ops".into());
        for owner in [None, Some("alice"), Some("ops")] {
            assert!(ops.may_see(owner));
        }
        assert_eq!(alice.owner(), Some("alice"));
        assert_eq!(ops.owner(), Some("ops"));
        assert_eq!(Caller::Shared.owner(), None);
        // A record: its `client` field, none for the shared namespace; no record, no job.
        let record = |owner: Option<&str>| -> HashMap<String, String> {
            let mut record = HashMap::from([("state".to_string(), "queued".to_string())]);
            if let Some(owner) = owner {
                record.insert(OWNER_FIELD.to_string(), owner.to_string());
            }
            record
        };
        assert!(alice.may_see_record(&record(Some("alice"))));
        assert!(!alice.may_see_record(&record(None)));
        assert!(Caller::Shared.may_see_record(&record(None)));
        assert!(!ops.may_see_record(&HashMap::new()));
    }

    #[test]
    fn entries_name_a_client_an_operator_or_none() {
        let parse = |e: &str| parse_token_entry(e, "line 1");
        assert_eq!(parse("  ").unwrap(), None);
        assert_eq!(parse("# alice tok-revoked").unwrap(), None);
        assert_eq!(
            parse(" tok-1 ").unwrap(),
            Some(Token {
                secret: "tok-1".into(),
                caller: Caller::Shared
            })
        );
        assert_eq!(
            parse("etl-eu\ttok-2").unwrap().unwrap().caller,
            client("etl-eu")
        );
        assert_eq!(
            parse("ops tok-3 operator").unwrap().unwrap(),
            Token {
                secret: "tok-3".into(),
                caller: Caller::Operator("ops".into())
            }
        );
        let err = parse("ops tok-3 admin").unwrap_err().to_string();
        assert_eq!(err, "line 1: the third word may only be `operator`");
        assert!(!err.contains("tok-3"), "{err}");
        let err = parse("a b c d").unwrap_err();
        assert!(matches!(err, TokenError::TooManyWords { .. }));
        let err = parse("al/ice tok-4").unwrap_err().to_string();
        assert!(err.contains("not `al/ice`"), "{err}");
        assert!(!err.contains("tok-4"), "{err}");
        assert!(parse("élise tok-5").is_err());
        // A header cannot carry it: it loaded, and no call could ever present it.
        let err = parse("uni tök-ü").unwrap_err().to_string();
        assert_eq!(
            err,
            "line 1: a token is printable ASCII (it travels in an HTTP header), not this one"
        );
        assert!(parse(&format!("{} tok-6", "a".repeat(65))).is_err());
    }

    #[test]
    fn the_environment_and_the_file_are_read_together_and_a_repeat_is_refused() {
        let tokens = configured_tokens(
            "tok-a, alice tok-b,,",
            Some(("tokens", "# comment\nops tok-c operator\n")),
        )
        .unwrap();
        let callers: Vec<Caller> = tokens.iter().map(|t| t.caller.clone()).collect();
        assert_eq!(
            callers,
            [
                Caller::Shared,
                client("alice"),
                Caller::Operator("ops".into())
            ]
        );
        assert!(configured_tokens("", None).unwrap().is_empty());
        // The same secret under two names would make the caller depend on the order.
        let err = configured_tokens("alice tok-a", Some(("tokens", "\nbob tok-a\n")))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "tokens line 2: this token is configured twice");
    }
}
