//! Admission of a submitted pipeline: one path for the job API and the submission queue.
//!
//! The spec is resolved from what the submission carries (its text, the SQL files it sent,
//! its parameters); nothing is read from the coordinator's disk, so `sql_file` cannot name a
//! coordinator file. Every source location must be absolute, and the access policy admits
//! the spec, rewriting each location to the canonical form it checked: the form the readers
//! then open.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use iceberg::TableIdent;
use iceberg::table::Table;
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

/// How long admission trusts a target table's metadata it looked up.
pub const RECENT_TABLE_TTL: Duration = Duration::from_secs(1);

/// Keeps at most this many tables; past it, those looked up longer ago than the TTL go.
const RECENT_TABLES_KEPT: usize = 1024;

/// The target tables admission looked up in the last [`RECENT_TABLE_TTL`], and whether they
/// existed: a burst of submissions to one table (a backfill's days, a scheduler's retries)
/// loads its metadata from the catalog once a second rather than once per submission (with
/// the SQLite catalog, its queries were about a fifth of the job API's time). Admission
/// only checks the result against the table; the job checks it again against the table as
/// it is when it runs, and its commit against the table as it is then.
#[derive(Default)]
pub struct RecentTables {
    tables: Mutex<HashMap<TableIdent, LookedUp>>,
}

#[derive(Clone)]
struct LookedUp {
    at: Instant,
    table: Option<Table>,
}

impl RecentTables {
    /// `ident` as the catalog has it (`None`: no such table), looked up within the TTL.
    pub async fn existing(
        &self,
        catalog: &dyn iceberg::Catalog,
        ident: &TableIdent,
    ) -> Result<Option<Table>, CoreError> {
        if let Some(table) = self.fresh(ident, Instant::now()) {
            return Ok(table);
        }
        let at = Instant::now();
        let table = nightshift_core::table::load_if_exists(catalog, ident).await?;
        self.remember(
            ident,
            LookedUp {
                at,
                table: table.clone(),
            },
        );
        Ok(table)
    }

    fn fresh(&self, ident: &TableIdent, now: Instant) -> Option<Option<Table>> {
        let tables = self.tables.lock().expect("recent tables lock");
        let looked_up = tables.get(ident)?;
        is_fresh(looked_up.at, now).then(|| looked_up.table.clone())
    }

    fn remember(&self, ident: &TableIdent, looked_up: LookedUp) {
        let mut tables = self.tables.lock().expect("recent tables lock");
        if tables.len() >= RECENT_TABLES_KEPT {
            let now = Instant::now();
            tables.retain(|_, t| is_fresh(t.at, now));
        }
        if tables.len() < RECENT_TABLES_KEPT {
            tables.insert(ident.clone(), looked_up);
        }
    }
}

/// Whether a lookup made `at` may still stand in for the catalog at `now`.
fn is_fresh(at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(at) < RECENT_TABLE_TTL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_stands_for_under_a_second() {
        let at = Instant::now();
        assert!(is_fresh(at, at));
        assert!(is_fresh(at, at + Duration::from_millis(999)));
        assert!(!is_fresh(at, at + RECENT_TABLE_TTL));
        // A clock read before the lookup (another thread's `now`) is not "older".
        assert!(is_fresh(at + Duration::from_millis(5), at));
    }

    #[test]
    fn a_full_cache_keeps_only_fresh_lookups() {
        let recent = RecentTables::default();
        let long_ago = Instant::now() - 2 * RECENT_TABLE_TTL;
        let ident = |i: usize| TableIdent::from_strs(["ns", &format!("t{i}")]).unwrap();
        for i in 0..RECENT_TABLES_KEPT {
            recent.remember(
                &ident(i),
                LookedUp {
                    at: long_ago,
                    table: None,
                },
            );
        }
        recent.remember(
            &ident(RECENT_TABLES_KEPT),
            LookedUp {
                at: Instant::now(),
                table: None,
            },
        );
        let tables = recent.tables.lock().unwrap();
        assert_eq!(tables.len(), 1);
        drop(tables);
        assert_eq!(
            recent
                .fresh(&ident(RECENT_TABLES_KEPT), Instant::now())
                .map(|t| t.is_none()),
            Some(true)
        );
        assert!(recent.fresh(&ident(0), Instant::now()).is_none());
    }

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
            client: None,
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
