//! Idempotency keys of the job API, as decisions without services.
//!
//! A key is bound to the first request that brings it: its job, the digest of its spec, files
//! and parameters, and when it was bound. The same request again gets that job back; another
//! request under the key is refused, naming the key, instead of silently getting a job that
//! runs something else. A key is bound before its job is queued: if queueing fails the key is
//! freed, and if the process dies in between, a retry of the same request after
//! [`REPUBLISH_AFTER`] queues the bound job again (a job id runs and commits at most once,
//! so a second submission of it is harmless).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// How long a bound job may stay unqueued before a retry of its request queues it again.
pub const REPUBLISH_AFTER_MS: i64 = 10_000;

/// What a key is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBinding {
    pub job: String,
    /// `JobSubmission::request_digest` of the request that bound the key.
    pub digest: String,
    pub bound_at_ms: i64,
}

impl KeyBinding {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a key binding serializes")
    }

    /// A stored binding; a bare job id (what earlier versions stored) matches any request.
    pub fn decode(text: &str) -> KeyBinding {
        serde_json::from_str(text).unwrap_or_else(|_| KeyBinding {
            job: text.to_string(),
            digest: String::new(),
            bound_at_ms: 0,
        })
    }
}

/// What a submission carrying a key gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyDecision {
    /// This request bound the key: its job is created.
    Create,
    /// The key came with this same request before: that job is the answer.
    Existing { job: String },
    /// The key is bound to another request.
    Conflict { job: String },
}

/// The decision for a request with `digest`, given the key's earlier binding (`None` when
/// this request just bound it).
pub fn decide(earlier: Option<&KeyBinding>, digest: &str) -> KeyDecision {
    match earlier {
        None => KeyDecision::Create,
        Some(b) if b.digest.is_empty() || b.digest == digest => {
            KeyDecision::Existing { job: b.job.clone() }
        }
        Some(b) => KeyDecision::Conflict { job: b.job.clone() },
    }
}

/// Whether the job of an existing binding must be queued again: its record does not show it
/// queued (`published`) or beyond, and the binding is old enough that the request that bound
/// it is not still queueing it.
pub fn needs_republish(
    binding: &KeyBinding,
    record: &HashMap<String, String>,
    now_ms: i64,
) -> bool {
    let queued_or_beyond =
        record.contains_key("published") || record.get("state").is_some_and(|s| s != "queued");
    !queued_or_beyond && now_ms - binding.bound_at_ms >= REPUBLISH_AFTER_MS
}

/// What a submission that names its own job id (`SubmitJobRequest.job_id`, as `run
/// --job-id` and `backfill` do) gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChosenIdDecision {
    /// Unknown, or ended without committing (failed, cancelled): the job is (re)queued.
    Submit,
    /// Queued, running or succeeded with this same request: that job is the answer.
    Existing,
    /// Queued, running or succeeded with another request (`state`).
    Conflict { state: String },
    /// Failed, cancelled or asked to cancel, but still ending (`state`): its run is stopping
    /// its tasks and has not stored its outcome. A rerun queued now joined that run on its
    /// coordinator (or was answered with it) and ended with it, never run.
    Ending { state: String },
}

/// The decision for a request with `digest` naming a job id whose record is `record` (empty
/// when the job is unknown). A job id commits at most once, so a rerun of a failed job under
/// its id is the normal way to finish it, with the same spec or a fixed one.
pub fn decide_chosen_id(record: &HashMap<String, String>, digest: &str) -> ChosenIdDecision {
    let state = record.get("state").map(String::as_str).unwrap_or_default();
    // The outcome (`report`) is stored once the run has ended, cleanup done.
    let ending = !record.contains_key("report")
        && (record.contains_key("cancel") || matches!(state, "failed" | "cancelled"));
    if ending {
        return ChosenIdDecision::Ending {
            state: state.to_string(),
        };
    }
    match state {
        "" | "failed" | "cancelled" => ChosenIdDecision::Submit,
        _ => match record.get("digest") {
            Some(stored) if stored != digest => ChosenIdDecision::Conflict {
                state: state.to_string(),
            },
            _ => ChosenIdDecision::Existing,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(digest: &str, at: i64) -> KeyBinding {
        KeyBinding {
            job: "j1".into(),
            digest: digest.into(),
            bound_at_ms: at,
        }
    }

    #[test]
    fn a_key_answers_only_the_request_it_was_bound_to() {
        assert_eq!(decide(None, "d"), KeyDecision::Create);
        assert_eq!(
            decide(Some(&binding("d", 0)), "d"),
            KeyDecision::Existing { job: "j1".into() }
        );
        assert_eq!(
            decide(Some(&binding("d", 0)), "other"),
            KeyDecision::Conflict { job: "j1".into() }
        );
        // Bound by an earlier version, without a digest.
        assert_eq!(
            decide(Some(&KeyBinding::decode("j0")), "any"),
            KeyDecision::Existing { job: "j0".into() }
        );
    }

    #[test]
    fn a_chosen_job_id_runs_again_only_when_it_did_not_commit() {
        let record = |state: &str, digest: &str| -> HashMap<String, String> {
            [("state", state), ("digest", digest)]
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            decide_chosen_id(&record("", ""), "d"),
            ChosenIdDecision::Submit
        );
        let with_outcome = |state: &str, digest: &str| {
            let mut record = record(state, digest);
            record.insert("report".into(), format!("{{\"status\":\"{state}\"}}"));
            record
        };
        for ended in ["failed", "cancelled"] {
            // Rerun, with the same request or a fixed one, once the run has ended.
            assert_eq!(
                decide_chosen_id(&with_outcome(ended, "d"), "d"),
                ChosenIdDecision::Submit
            );
            assert_eq!(
                decide_chosen_id(&with_outcome(ended, "d"), "e"),
                ChosenIdDecision::Submit
            );
            // Not while it is still ending: the rerun would join that run and end with it.
            assert_eq!(
                decide_chosen_id(&record(ended, "d"), "d"),
                ChosenIdDecision::Ending {
                    state: ended.to_string()
                }
            );
        }
        // Asked to cancel and not yet ended: ending too, whatever its state says yet.
        for alive in ["queued", "running"] {
            let mut cancelled = record(alive, "d");
            cancelled.insert("cancel".into(), "1".into());
            assert_eq!(
                decide_chosen_id(&cancelled, "d"),
                ChosenIdDecision::Ending {
                    state: alive.to_string()
                }
            );
        }
        for alive in ["queued", "running", "committing", "succeeded"] {
            assert_eq!(
                decide_chosen_id(&record(alive, "d"), "d"),
                ChosenIdDecision::Existing
            );
            assert_eq!(
                decide_chosen_id(&record(alive, "d"), "e"),
                ChosenIdDecision::Conflict {
                    state: alive.to_string()
                }
            );
            // Recorded without a digest (by `run --cluster`): the job is the answer.
            assert_eq!(
                decide_chosen_id(&record(alive, ""), "e"),
                ChosenIdDecision::Existing
            );
        }
    }

    #[test]
    fn bindings_round_trip() {
        let b = binding("abc", 42);
        assert_eq!(KeyBinding::decode(&b.encode()), b);
    }

    #[test]
    fn only_an_old_unqueued_binding_is_queued_again() {
        let record = |fields: &[(&str, &str)]| -> HashMap<String, String> {
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let old = binding("d", 0);
        let late = REPUBLISH_AFTER_MS;
        assert!(needs_republish(&old, &record(&[]), late));
        assert!(needs_republish(&old, &record(&[("state", "queued")]), late));
        assert!(!needs_republish(
            &old,
            &record(&[("state", "queued")]),
            late - 1
        ));
        assert!(!needs_republish(
            &old,
            &record(&[("state", "queued"), ("published", "1")]),
            late
        ));
        assert!(!needs_republish(
            &old,
            &record(&[("state", "running")]),
            late
        ));
        assert!(!needs_republish(
            &old,
            &record(&[("state", "succeeded")]),
            late
        ));
    }
}
