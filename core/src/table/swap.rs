//! Swapping a table's metadata in the catalog for a change Nightshift builds itself.
//!
//! iceberg-rust 0.10 commits only the actions it ships (`Catalog::update_table` takes a
//! `TableCommit` that cannot be built outside the crate), and it has no overwrite. So for the
//! snapshots we produce ourselves (`overwrite`) this module makes the catalog's atomic swap
//! the way each catalog does it:
//! - SQL (SQLite, PostgreSQL): write the next metadata file, then the same compare-and-swap
//!   `UPDATE iceberg_tables … WHERE metadata_location = <the one we built on>` as
//!   iceberg-catalog-sql and the Java JDBC catalog;
//! - REST: `POST /v1/{prefix}/namespaces/{ns}/tables/{table}` with the requirements and
//!   updates (the REST spec's CommitTableRequest); the server checks the requirements.

use std::str::FromStr;
use std::time::Duration;

use iceberg::table::Table;
use iceberg::{MetadataLocation, TableIdent, TableRequirement, TableUpdate};
use serde::Deserialize;

use super::catalog::{CatalogConfig, Secret};
use crate::error::CoreError;

/// How a swap ended when it did not land.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// Someone else changed the table since it was loaded: reload and build again.
    #[error("the table changed while committing: {0}")]
    Conflict(String),
    /// The catalog failed in a way that leaves the outcome unknown (a REST 5xx, a lost
    /// connection after the request was sent): reload and look for the snapshot.
    #[error("the commit's outcome is unknown: {0}")]
    Unknown(String),
    /// The swap cannot land (bad request, table gone, storage refused the metadata file).
    #[error(transparent)]
    Failed(#[from] CoreError),
}

impl From<iceberg::Error> for SwapError {
    fn from(e: iceberg::Error) -> Self {
        SwapError::Failed(e.into())
    }
}

/// Applies `updates` to `table` (loaded from the catalog, unchanged since) in one atomic swap,
/// provided `requirements` hold on the catalog's current version of the table.
pub async fn swap_table_metadata(
    config: &CatalogConfig,
    table: &Table,
    updates: Vec<TableUpdate>,
    requirements: Vec<TableRequirement>,
) -> std::result::Result<(), SwapError> {
    match config {
        CatalogConfig::Sql { name, uri, .. } => {
            swap_sql(name, uri, table, updates, requirements).await
        }
        CatalogConfig::Rest {
            uri,
            warehouse,
            credential,
            ..
        } => {
            let rest = RestTarget {
                uri: uri.trim_end_matches('/'),
                warehouse,
                credential: credential.as_ref(),
            };
            rest.commit(table.identifier(), updates, requirements).await
        }
    }
}

async fn swap_sql(
    catalog_name: &str,
    uri: &str,
    table: &Table,
    updates: Vec<TableUpdate>,
    requirements: Vec<TableRequirement>,
) -> std::result::Result<(), SwapError> {
    // The compare-and-swap below lands only if the catalog still points at `table`'s
    // metadata, so checking the requirements on it is checking them on the current table.
    for requirement in &requirements {
        requirement
            .check(Some(table.metadata()))
            .map_err(|e| SwapError::Conflict(e.message().to_string()))?;
    }
    let current = table.metadata_location_result()?.to_string();
    let mut builder = table.metadata().clone().into_builder(Some(current.clone()));
    for update in updates {
        builder = update.apply(builder)?;
    }
    let metadata = builder.build()?.metadata;
    let next = MetadataLocation::from_str(&current)?
        .with_next_version()
        .with_new_metadata(&metadata);
    metadata.write_to(table.file_io(), &next).await?;
    let next = next.to_string();

    let ident = table.identifier();
    let swapped = compare_and_swap_location(catalog_name, uri, ident, &current, &next).await;
    match swapped {
        Ok(true) => Ok(()),
        Ok(false) => {
            let _ = table.file_io().delete(&next).await;
            Err(SwapError::Conflict(format!(
                "{ident} is no longer at {current}"
            )))
        }
        Err(e) => Err(SwapError::Unknown(format!("{ident}: {e}"))),
    }
}

/// `UPDATE iceberg_tables SET metadata_location = next WHERE … metadata_location = current`;
/// true when the row was swapped.
async fn compare_and_swap_location(
    catalog_name: &str,
    uri: &str,
    ident: &TableIdent,
    current: &str,
    next: &str,
) -> std::result::Result<bool, sqlx::Error> {
    sqlx::any::install_default_drivers();
    let placeholders: Vec<String> = if uri.starts_with("sqlite:") {
        vec!["?".into(); 6]
    } else {
        (1..=6).map(|i| format!("${i}")).collect()
    };
    let [p1, p2, p3, p4, p5, p6] = &placeholders[..] else {
        unreachable!("six placeholders")
    };
    let sql = format!(
        "UPDATE iceberg_tables SET metadata_location = {p1}, previous_metadata_location = {p2} \
         WHERE catalog_name = {p3} AND table_namespace = {p4} AND table_name = {p5} \
         AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL) AND metadata_location = {p6}"
    );
    let mut connection = <sqlx::AnyConnection as sqlx::Connection>::connect(uri).await?;
    let result = sqlx::query(&sql)
        .bind(next)
        .bind(current)
        .bind(catalog_name)
        .bind(ident.namespace().join("."))
        .bind(ident.name())
        .bind(current)
        .execute(&mut connection)
        .await?;
    let _ = sqlx::Connection::close(connection).await;
    Ok(result.rows_affected() == 1)
}

/// The REST catalog a swap goes to.
struct RestTarget<'a> {
    uri: &'a str,
    warehouse: &'a str,
    credential: Option<&'a Secret>,
}

/// `GET /v1/config`: the catalog's `prefix` lives in its overrides or defaults.
#[derive(Deserialize)]
struct RestConfig {
    #[serde(default)]
    overrides: std::collections::HashMap<String, String>,
    #[serde(default)]
    defaults: std::collections::HashMap<String, String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
}

impl RestTarget<'_> {
    async fn commit(
        &self,
        ident: &TableIdent,
        updates: Vec<TableUpdate>,
        requirements: Vec<TableRequirement>,
    ) -> std::result::Result<(), SwapError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| self.failed(format!("cannot build an HTTP client: {e}")))?;
        let token = self.token(&client).await?;
        let config: RestConfig = self
            .send(
                client
                    .get(format!("{}/v1/config", self.uri))
                    .query(&[("warehouse", self.warehouse)]),
                token.as_deref(),
            )
            .await?
            .json()
            .await
            .map_err(|e| self.failed(format!("unreadable /v1/config answer: {e}")))?;
        let prefix = config
            .overrides
            .get("prefix")
            .or(config.defaults.get("prefix"));
        let mut url = format!("{}/v1", self.uri);
        if let Some(prefix) = prefix {
            url = format!("{url}/{prefix}");
        }
        let url = format!(
            "{url}/namespaces/{}/tables/{}",
            ident.namespace().to_url_string(),
            ident.name()
        );
        let body = serde_json::json!({
            "identifier": ident,
            "requirements": requirements,
            "updates": updates,
        });
        let response = client
            .post(url)
            .json(&body)
            .bearer_auth_opt(token.as_deref())
            .send()
            .await
            // The request may have reached the server: only a reload tells.
            .map_err(|e| SwapError::Unknown(format!("{ident}: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        Err(match status.as_u16() {
            409 => SwapError::Conflict(format!("{ident}: {text}")),
            500 | 502 | 503 | 504 => SwapError::Unknown(format!("{ident}: HTTP {status}: {text}")),
            _ => self.failed(format!("commit to {ident} refused: HTTP {status}: {text}")),
        })
    }

    /// An OAuth2 client-credentials token when the catalog is configured with a credential.
    async fn token(
        &self,
        client: &reqwest::Client,
    ) -> std::result::Result<Option<String>, SwapError> {
        let Some(Secret(credential)) = self.credential else {
            return Ok(None);
        };
        let (id, secret) = credential.split_once(':').unwrap_or(("", credential));
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_secret", secret),
            ("scope", "catalog"),
        ];
        if !id.is_empty() {
            form.push(("client_id", id));
        }
        let response: TokenResponse = self
            .send(
                client
                    .post(format!("{}/v1/oauth/tokens", self.uri))
                    .form(&form),
                None,
            )
            .await?
            .json()
            .await
            .map_err(|e| self.failed(format!("unreadable OAuth2 token answer: {e}")))?;
        Ok(Some(response.access_token))
    }

    /// Sends a request whose failure is harmless (nothing was changed yet).
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        token: Option<&str>,
    ) -> std::result::Result<reqwest::Response, SwapError> {
        let response = request
            .bearer_auth_opt(token)
            .send()
            .await
            .map_err(|e| self.failed(format!("REST catalog {}: {e}", self.uri)))?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            return Err(self.failed(format!("REST catalog {}: HTTP {status}: {text}", self.uri)));
        }
        Ok(response)
    }

    fn failed(&self, message: String) -> SwapError {
        SwapError::Failed(CoreError::Catalog(message))
    }
}

trait BearerAuthOpt {
    fn bearer_auth_opt(self, token: Option<&str>) -> Self;
}

impl BearerAuthOpt for reqwest::RequestBuilder {
    fn bearer_auth_opt(self, token: Option<&str>) -> Self {
        match token {
            Some(token) => self.bearer_auth(token),
            None => self,
        }
    }
}
