//! Admission of a submitted pipeline: one path for the job API and the submission queue.
//!
//! The spec is resolved from what the submission carries (its text, the SQL files it sent,
//! its parameters); nothing is read from the coordinator's disk, so `sql_file` cannot name a
//! coordinator file. Every source location must be absolute, and the access policy admits
//! the spec, rewriting each location to the canonical form it checked: the form the readers
//! then open.

use nightshift_cluster::submission::JobSubmission;
use nightshift_core::CoreError;
use nightshift_core::access::{AccessError, AccessPolicy};
use nightshift_spec::{ResolvedSpec, SpecError};

/// Why a submission is not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The spec does not parse, names what was not sent, or a relative location.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// It reaches outside the access policy.
    #[error(transparent)]
    Denied(#[from] AccessError),
}

impl From<Refusal> for CoreError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Spec(e) => CoreError::Spec(e),
            Refusal::Denied(e) => CoreError::Access(e),
        }
    }
}

/// The spec `submission` asks to run, admitted by `access`, locations in canonical form.
pub async fn admit(
    submission: &JobSubmission,
    access: &AccessPolicy,
) -> Result<ResolvedSpec, Refusal> {
    let mut spec = nightshift_spec::resolve_submitted(
        &submission.spec,
        &submission.files,
        &submission.params,
    )?;
    spec.git_commit = submission.git_commit.clone();
    Ok(access.admit(spec).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submission(spec: &str, files: &[(&str, &str)]) -> JobSubmission {
        JobSubmission {
            job_id: String::new(),
            spec: spec.to_string(),
            files: files
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            params: Vec::new(),
            git_commit: None,
        }
    }

    fn spec(location: &str, transform: &str) -> String {
        format!(
            "[pipeline]\nname = \"p\"\n[[source]]\nname = \"s\"\nformat = \"csv\"\nlocation = \"{location}\"\n[transform]\n{transform}\n[target]\ntable = \"t.t\"\n"
        )
    }

    #[tokio::test]
    async fn sql_files_come_from_the_submission_never_from_disk() {
        let open = AccessPolicy::allow_all();
        let sent = submission(
            &spec("/data/x.csv", "sql_file = \"/etc/hostname\""),
            &[("/etc/hostname", "SELECT 1 AS one")],
        );
        let admitted = admit(&sent, &open).await.unwrap();
        assert_eq!(admitted.sql, "SELECT 1 AS one");
        for file in ["/etc/passwd", "../../../../etc/passwd", "t.sql"] {
            let unsent = submission(&spec("/data/x.csv", &format!("sql_file = \"{file}\"")), &[]);
            let err = admit(&unsent, &open).await.unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "sql_file `{file}` was not sent with the spec (sent: none)"
                )),
                "{err}"
            );
            assert!(!err.contains("root"), "{err}");
        }
    }

    #[tokio::test]
    async fn relative_locations_are_refused_and_absolute_ones_made_canonical() {
        let open = AccessPolicy::allow_all();
        let relative = submission(&spec("data/x.csv", "sql = \"SELECT 1\""), &[]);
        let err = admit(&relative, &open).await.unwrap_err().to_string();
        assert!(
            err.contains("source `s`: location `data/x.csv` is relative"),
            "{err}"
        );
        let encoded = submission(
            &spec(
                "file:///nonexistent-ns/a/%2E%2E/x.csv",
                "sql = \"SELECT 1\"",
            ),
            &[],
        );
        let admitted = admit(&encoded, &open).await.unwrap();
        assert_eq!(
            admitted.spec.source[0].location.as_deref(),
            Some("/nonexistent-ns/x.csv")
        );
    }
}
