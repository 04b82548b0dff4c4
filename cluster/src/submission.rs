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
}

impl JobSubmission {
    /// Reads a spec and the SQL file it names.
    pub fn from_spec_file(
        job_id: &str,
        path: &Path,
        params: Vec<(String, String)>,
    ) -> std::io::Result<Self> {
        let spec = std::fs::read_to_string(path)?;
        let mut files = BTreeMap::new();
        if let Ok(value) = spec.parse::<toml::Table>()
            && let Some(sql_file) = value
                .get("transform")
                .and_then(|t| t.get("sql_file"))
                .and_then(|f| f.as_str())
        {
            let base = path.parent().unwrap_or(Path::new("."));
            files.insert(
                sql_file.to_string(),
                std::fs::read_to_string(base.join(sql_file))?,
            );
        }
        Ok(JobSubmission {
            job_id: job_id.to_string(),
            spec,
            files,
            params,
        })
    }

    /// Writes the spec and its files into `dir` and returns the spec path.
    pub fn materialize(&self, dir: &Path) -> std::io::Result<std::path::PathBuf> {
        for (name, text) in &self.files {
            let path = dir.join(name);
            if !path.starts_with(dir) || name.contains("..") {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("file `{name}` escapes the spec directory"),
                ));
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, text)?;
        }
        let spec = dir.join("pipeline.toml");
        std::fs::write(&spec, &self.spec)?;
        Ok(spec)
    }
}
