//! The Iceberg side: the catalog, table creation from a result schema, data-file writing on
//! workers and the one-snapshot-per-job commit on the coordinator.

pub mod backfill_values;
pub mod catalog;
pub mod commit;
pub mod compact;
pub mod earlier_specs;
pub mod evolution;
pub mod expired_jobs;
pub mod files;
pub mod job_guard;
pub mod layout;
pub mod live;
pub mod maintain;
mod open_files;
pub mod overwrite;
pub mod parquet_settings;
mod partition_values;
pub mod provenance;
pub mod references;
pub mod rejects;
pub mod retention;
pub mod schema;
pub mod swap;
pub mod writer;

pub use catalog::{CatalogConfig, Secret, load_if_exists, open_catalog, open_existing_table};
pub use commit::{
    CommitOutcome, JOB_ID_PROPERTY, JobCommit, PIPELINE_PROPERTY, WrittenWith, commit_job_snapshot,
    committed_before, find_job_snapshot, in_current_history, parse_table_ident, previous_run_rows,
};
pub use evolution::SchemaChange;
pub use layout::{
    TargetLayout, check_compatible, ensure_table, ensure_target, target_layout,
    with_table_types_for_nulls,
};
pub use references::TableReferences;
pub use rejects::{ensure_rejects_table, rejects_schema};
pub use schema::iceberg_schema_for;
pub use writer::{
    PartitionFileCounts, TableWriteSummary, WriteLayout, data_file_paths, files_per_partition,
    table_output, write_batches, write_data_files,
};
