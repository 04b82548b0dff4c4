//! Secret redaction for everything Nightshift writes where others read: logs, job records in
//! the state store, snapshot summaries. Credentials reach errors through URLs
//! (`amqp://user:password@host`), `key=value` settings and bearer tokens; each is masked.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

/// What replaces a secret.
pub const MASK: &str = "***";

/// Words that make a setting or parameter name secret.
const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "credential",
    "apikey",
    "api_key",
    "api-key",
    "access_key",
    "access-key",
    "private_key",
    "session_key",
];

static PATTERNS: LazyLock<[(Regex, &'static str); 3]> = LazyLock::new(|| {
    [
        // scheme://user:password@host → scheme://user:***@host
        (
            Regex::new(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@").unwrap(),
            "${pre}***@",
        ),
        // Bearer tokens in headers or messages.
        (
            Regex::new(r"(?i)(?P<pre>\bbearer\s+)[A-Za-z0-9._~+/=-]+").unwrap(),
            "${pre}***",
        ),
        // password=..., "client_secret": "...", token: ... (names containing a secret word).
        (
            Regex::new(
                r#"(?i)(?P<pre>[A-Za-z0-9_.-]*(?:password|passwd|secret|token|credential|api[_-]?key|access[_-]key|private[_-]key|session[_-]key)[A-Za-z0-9_.-]*["']?\s*[=:]\s*["']?)[^\s"',;&}]+"#,
            )
            .unwrap(),
            "${pre}***",
        ),
    ]
});

/// `text` with credentials masked.
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    for (pattern, replacement) in PATTERNS.iter() {
        if pattern.is_match(&out) {
            out = Cow::Owned(pattern.replace_all(&out, *replacement).into_owned());
        }
    }
    out
}

/// The shortest value [`mask_values`] masks: a shorter one would mask common text, and is no
/// secret anyway.
pub const MIN_MASKED_VALUE_LEN: usize = 4;

/// `text` with every occurrence of the values in `secrets` (the values of secret-named
/// parameters, substituted into a spec's SQL and so into its plan) masked.
pub fn mask_values<'a>(text: &'a str, secrets: &[&str]) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(text);
    for secret in secrets {
        if secret.len() >= MIN_MASKED_VALUE_LEN && out.contains(secret) {
            out = Cow::Owned(out.replace(secret, MASK));
        }
    }
    out
}

/// Whether a setting or parameter called `name` holds a secret (`db_password`, `API_TOKEN`).
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| name.contains(w))
}

/// A `tracing_subscriber` writer that redacts each formatted event before it reaches `W`.
pub struct RedactingWriter<W>(pub W);

impl<W: std::io::Write> std::io::Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer hands over one whole event per write.
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_parameter_values_are_masked_wherever_they_were_substituted() {
        let sql = "SELECT id, 'hunter2' AS pw FROM src WHERE 'tkn-SECRET-123' = token";
        assert_eq!(
            mask_values(sql, &["hunter2", "tkn-SECRET-123"]),
            "SELECT id, '***' AS pw FROM src WHERE '***' = token"
        );
        // Too short to be a secret, and masking it would garble the text.
        assert_eq!(mask_values(sql, &["id", ""]), sql);
    }

    #[test]
    fn masks_url_passwords_tokens_and_settings() {
        let cases = [
            (
                "cannot reach amqp://guest:hunter2@broker:5672/%2f",
                "cannot reach amqp://guest:***@broker:5672/%2f",
            ),
            (
                "authorization: Bearer abc.DEF-123",
                "authorization: Bearer ***",
            ),
            (
                "catalog said: client_secret=s3cr3t&scope=x",
                "catalog said: client_secret=***&scope=x",
            ),
            (
                r#"{"db_password": "p@ss", "user": "me"}"#,
                r#"{"db_password": "***", "user": "me"}"#,
            ),
            (
                "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG",
                "AWS_SECRET_ACCESS_KEY=***",
            ),
            ("credential = key:secret", "credential = ***"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact(input), expected, "{input}");
        }
    }

    #[test]
    fn leaves_ordinary_text_alone() {
        for text in [
            "stage 2 task 1 failed: file s3://lake/raw/x.csv line 3 column `id`",
            "http://127.0.0.1:8181/v1/config",
            "run_date=2024-01-01",
        ] {
            assert!(matches!(redact(text), Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn secret_names() {
        assert!(is_secret_name("db_password"));
        assert!(is_secret_name("API_TOKEN"));
        assert!(!is_secret_name("run_date"));
    }
}
