//! The Nightshift engine, shared by the coordinator, the workers and the embedded mode.
//!
//! - [`access`] limits what a submitted pipeline may read and write.
//! - [`planner`] turns a pipeline's SQL into Ballista query stages, or into one shared
//!   in-process stage for the embedded mode ([`shared_plan`]); [`joins`] picks join
//!   strategies that stay correct when partitions run as separate tasks; [`window_topk`]
//!   keeps only the rows a `ROW_NUMBER() ... <= K` filter can keep before the window's sort;
//!   [`broadcast_scans`] lets a stage read a small broadcast table from its source instead
//!   of from a stage of its own.
//! - [`session`] builds DataFusion sessions and the bounded, spilling runtime tasks run in.
//! - [`shuffle`] moves stage outputs through object storage; [`codec`] serializes stage plans.
//! - [`names`] builds and parses every object name the engine writes.
//! - [`task`] runs one partition of one stage on a worker; [`shared_builds`] lets the tasks
//!   of a stage in one process build each broadcast join's table once.
//! - [`table`] creates Iceberg tables, writes data files and commits snapshots.
//! - [`metrics`] names every exported metric and records each event.
//! - [`redact`] masks credentials in logs, job records and snapshot summaries.
//! - [`transport`] holds the seams (task queue, state store) and their in-process versions.

pub mod access;
pub mod bounded_functions;
pub mod broadcast_scans;
pub mod checked_integers;
pub mod checks;
pub mod codec;
pub mod error;
pub mod file_inspections;
pub mod iceberg_scan;
pub mod ids;
pub mod incremental;
pub mod joins;
pub mod local_store;
pub mod merge;
pub mod merge_files;
pub mod metrics;
pub mod names;
pub mod not_null;
pub mod planner;
pub mod redact;
pub mod session;
pub mod shared_builds;
pub mod shared_plan;
pub mod shuffle;
pub mod sources;
pub mod sql_depth;
pub mod storage;
pub mod table;
pub mod task;
pub mod transport;
pub mod window_topk;

pub use error::{CoreError, Result};
pub use ids::{JobId, StageId, TaskKey};
