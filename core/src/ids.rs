//! Identifier newtypes, so a job id is never passed where a stage id is meant.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A job: one run of one pipeline, committed as at most one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(String);

impl JobId {
    /// A fresh, time-ordered job id.
    pub fn generate() -> Self {
        JobId(uuid::Uuid::now_v7().to_string())
    }

    /// Accepts a caller-chosen id (`--job-id`). It becomes one segment of object paths, so
    /// only letters, digits, `-`, `_` and `.` are allowed, and it may not start with `.`
    /// (`.` and `..` would name the scratch root or its parent).
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(JobId(s.to_string()))
        } else {
            Err(format!(
                "job id `{s}` must be 1-128 characters of letters, digits, `-`, `_` or `.`, not starting with `.`"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stage of a job's plan, numbered by Ballista's planner from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StageId(pub u32);

impl fmt::Display for StageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One task: a partition of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskKey {
    pub stage: StageId,
    pub partition: u32,
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stage {} partition {}", self.stage, self.partition)
    }
}

#[cfg(test)]
mod tests {
    use super::JobId;

    #[test]
    fn job_ids_are_one_safe_path_segment() {
        for ok in ["etl", "etl-sales-2024", "a.b", "a..b", "x_1", "-s1", "9"] {
            assert!(JobId::parse(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(129);
        for bad in [
            "",
            ".",
            "..",
            "...",
            ".hidden",
            "a/b",
            "a b",
            "é",
            "a%2F",
            long.as_str(),
        ] {
            assert!(JobId::parse(bad).is_err(), "{bad}");
        }
    }
}
