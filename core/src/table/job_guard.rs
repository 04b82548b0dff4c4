//! A catalog wrapper that makes iceberg-rust's commit conditional on "this job is not in the
//! table's history yet".
//!
//! `Transaction::commit` reloads the table and re-applies its actions when the catalog reports
//! a conflict. Without a guard, a second coordinator committing the same job id at the same
//! moment would lose the compare-and-swap, reload, and append the job's files again. Every
//! commit attempt starts with `load_table`, and the table it loads is the base the attempt's
//! requirements are checked against (`main` must still point at its snapshot), so refusing
//! that load when the job id is already there closes the window: either this attempt's swap
//! lands on a history without the job, or a later attempt sees the job and stops.

use std::collections::HashMap;

use async_trait::async_trait;
use iceberg::table::Table;
use iceberg::{
    Catalog, Error, ErrorKind, Namespace, NamespaceIdent, Result, TableCommit, TableCreation,
    TableIdent,
};

use super::commit::find_job_snapshot;
use crate::ids::JobId;

/// Delegates everything to `inner`, but fails loading `table` once `job` is in its history.
#[derive(Debug)]
pub struct JobGuardCatalog<'a> {
    inner: &'a dyn Catalog,
    table: TableIdent,
    job: JobId,
    /// The commit's snapshot summary: its incremental sources must not have been consumed
    /// by another run meanwhile ([`crate::incremental::overtaken`]).
    summary: HashMap<String, String>,
}

impl<'a> JobGuardCatalog<'a> {
    pub fn new(inner: &'a dyn Catalog, table: TableIdent, job: JobId) -> Self {
        JobGuardCatalog {
            inner,
            table,
            job,
            summary: HashMap::new(),
        }
    }

    /// Also refuses loads on which a commit with `summary` would consume its incremental
    /// sources twice.
    pub fn with_summary(mut self, summary: HashMap<String, String>) -> Self {
        self.summary = summary;
        self
    }
}

#[async_trait]
impl Catalog for JobGuardCatalog<'_> {
    async fn load_table(&self, table: &TableIdent) -> Result<Table> {
        let loaded = self.inner.load_table(table).await?;
        if *table == self.table
            && let Some(snapshot) = find_job_snapshot(&loaded, &self.job)
        {
            return Err(Error::new(
                ErrorKind::PreconditionFailed,
                format!(
                    "job already committed: job {} is snapshot {snapshot} of {table}",
                    self.job
                ),
            ));
        }
        if *table == self.table
            && let Err(e) = super::commit::refuse_if_overtaken(&loaded, &self.summary)
        {
            return Err(Error::new(ErrorKind::PreconditionFailed, e.to_string()));
        }
        Ok(loaded)
    }

    async fn update_table(&self, commit: TableCommit) -> Result<Table> {
        let updated = self.inner.update_table(commit).await;
        if let Err(e) = &updated
            && e.kind() == ErrorKind::CatalogCommitConflicts
        {
            crate::metrics::commit_conflict();
        }
        updated
    }

    async fn list_namespaces(
        &self,
        parent: Option<&NamespaceIdent>,
    ) -> Result<Vec<NamespaceIdent>> {
        self.inner.list_namespaces(parent).await
    }

    async fn create_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> Result<Namespace> {
        self.inner.create_namespace(namespace, properties).await
    }

    async fn get_namespace(&self, namespace: &NamespaceIdent) -> Result<Namespace> {
        self.inner.get_namespace(namespace).await
    }

    async fn namespace_exists(&self, namespace: &NamespaceIdent) -> Result<bool> {
        self.inner.namespace_exists(namespace).await
    }

    async fn update_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> Result<()> {
        self.inner.update_namespace(namespace, properties).await
    }

    async fn drop_namespace(&self, namespace: &NamespaceIdent) -> Result<()> {
        self.inner.drop_namespace(namespace).await
    }

    async fn list_tables(&self, namespace: &NamespaceIdent) -> Result<Vec<TableIdent>> {
        self.inner.list_tables(namespace).await
    }

    async fn create_table(
        &self,
        namespace: &NamespaceIdent,
        creation: TableCreation,
    ) -> Result<Table> {
        self.inner.create_table(namespace, creation).await
    }

    async fn drop_table(&self, table: &TableIdent) -> Result<()> {
        self.inner.drop_table(table).await
    }

    async fn purge_table(&self, table: &TableIdent) -> Result<()> {
        self.inner.purge_table(table).await
    }

    async fn table_exists(&self, table: &TableIdent) -> Result<bool> {
        self.inner.table_exists(table).await
    }

    async fn rename_table(&self, src: &TableIdent, dest: &TableIdent) -> Result<()> {
        self.inner.rename_table(src, dest).await
    }

    async fn register_table(&self, table: &TableIdent, metadata_location: String) -> Result<Table> {
        self.inner.register_table(table, metadata_location).await
    }
}
