//! A job submission: what `nightshift run --cluster` sends to the coordinator.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A pipeline to run, self-contained: the spec text and the SQL files it names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSubmission {
    pub job_id: String,
    /// The spec file's text.
    pub spec: String,
    /// Files the spec refers to (`sql_file`), by their path relative to the spec.
    pub files: BTreeMap<String, String>,
    pub params: Vec<(String, String)>,
    /// The git commit of the spec's repository on the submitter's side, for lineage; not
    /// part of what the request asks for.
    #[serde(default)]
    pub git_commit: Option<String>,
    /// The named API client that submitted it (`None`: the shared namespace), recorded as
    /// the job's owner; not part of what the request asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

impl JobSubmission {
    /// Reads a spec and the SQL file it names.
    pub fn from_spec_file(
        job_id: &str,
        path: &Path,
        params: Vec<(String, String)>,
    ) -> std::io::Result<Self> {
        let spec = std::fs::read_to_string(path)?;
        let spec_dir = nightshift_spec::spec_dir(path)?;
        let mut files = BTreeMap::new();
        if let Ok(value) = spec.parse::<toml::Table>()
            && let Some(sql_file) = value
                .get("transform")
                .and_then(|t| t.get("sql_file"))
                .and_then(|f| f.as_str())
        {
            files.insert(
                sql_file.to_string(),
                std::fs::read_to_string(spec_dir.join(sql_file))?,
            );
        }
        Ok(JobSubmission {
            job_id: job_id.to_string(),
            spec,
            files,
            params,
            git_commit: nightshift_spec::git_commit_of(&spec_dir),
            client: None,
        })
    }

    /// What the request asks for, as a digest of the spec, its files and its parameters (in
    /// name order): two submissions with one digest run the same thing. An idempotency key is
    /// bound to it, so the key cannot quietly stand for another request.
    pub fn request_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut params = self.params.clone();
        params.sort();
        let canonical = serde_json::json!({
            "spec": self.spec,
            "files": self.files,
            "params": params,
        });
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }
}

/// The job id of a submission with idempotency key `key` and request digest `digest` that
/// names no job id: the same key and request always give the same id. The key's binding in
/// Redis answers a retry while it lives; when it is gone (Redis flushed or restarted, the
/// binding expired), the retry still runs under the first one's id, which the table's
/// history knows as committed, so the rows are not written twice. A named client's keys
/// (`owner`) are its own: the same key and request from two clients are two jobs. The shared
/// namespace's ids are derived as they were before clients had names.
pub fn keyed_job_id(owner: Option<&str>, key: &str, digest: &str) -> nightshift_core::ids::JobId {
    use sha2::{Digest, Sha256};
    let hashed = match owner {
        None => serde_json::json!([key, digest]),
        Some(owner) => serde_json::json!([owner, key, digest]),
    };
    let hash = hex::encode(Sha256::digest(hashed.to_string().as_bytes()));
    nightshift_core::ids::JobId::parse(&format!("keyed-{}", &hash[..32]))
        .expect("hex digits make a job id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_and_request_give_one_job_id() {
        let first = keyed_job_id(None, "nightly-2024-01-01", "d1");
        assert_eq!(first, keyed_job_id(None, "nightly-2024-01-01", "d1"));
        assert_eq!(first.as_str().len(), "keyed-".len() + 32);
        // The shared namespace keeps the ids it derived before clients had names.
        assert_eq!(first.as_str(), "keyed-0594213b266cf1b4ebc610f49cfd0301");
        assert_ne!(first, keyed_job_id(None, "nightly-2024-01-01", "d2"));
        assert_ne!(first, keyed_job_id(None, "nightly-2024-01-0", "d1"));
        // No key and digest run together into another's.
        assert_ne!(
            keyed_job_id(None, "a\nb", "c"),
            keyed_job_id(None, "a", "b\nc")
        );
    }

    #[test]
    fn a_named_clients_keys_are_its_own() {
        let shared = keyed_job_id(None, "nightly", "d1");
        let alice = keyed_job_id(Some("alice"), "nightly", "d1");
        assert_eq!(alice, keyed_job_id(Some("alice"), "nightly", "d1"));
        assert_ne!(alice, shared);
        assert_ne!(alice, keyed_job_id(Some("bob"), "nightly", "d1"));
        // Names and keys do not run together.
        assert_ne!(
            keyed_job_id(Some("a"), "b", "d1"),
            keyed_job_id(Some("a\",\"b"), "", "d1")
        );
        assert_ne!(
            keyed_job_id(Some("alice"), "x", "d1"),
            keyed_job_id(None, "alice", "d1")
        );
    }

    fn submission(spec: &str, files: &[(&str, &str)], params: &[(&str, &str)]) -> JobSubmission {
        JobSubmission {
            job_id: String::new(),
            spec: spec.to_string(),
            files: files
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            git_commit: None,
            client: None,
        }
    }

    #[test]
    fn the_digest_names_the_request_not_its_order_or_id() {
        let a = submission("s", &[("t.sql", "q")], &[("a", "1"), ("b", "2")]);
        let mut same = submission("s", &[("t.sql", "q")], &[("b", "2"), ("a", "1")]);
        same.job_id = "other".into();
        same.git_commit = Some("abc".into());
        same.client = Some("alice".into());
        assert_eq!(a.request_digest(), same.request_digest());
        for different in [
            submission("s2", &[("t.sql", "q")], &[("a", "1"), ("b", "2")]),
            submission("s", &[("t.sql", "q2")], &[("a", "1"), ("b", "2")]),
            submission("s", &[("u.sql", "q")], &[("a", "1"), ("b", "2")]),
            submission("s", &[("t.sql", "q")], &[("a", "1"), ("b", "3")]),
            submission("s", &[("t.sql", "q")], &[("a", "1")]),
        ] {
            assert_ne!(
                a.request_digest(),
                different.request_digest(),
                "{different:?}"
            );
        }
    }
}
