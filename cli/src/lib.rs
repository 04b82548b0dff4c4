//! The `nightshift` command and the embedded mode it runs by default.
//!
//! - [`embedded`] runs a whole job in one process: in-process queue and state, local
//!   warehouse, SQLite catalog — the same coordinator and worker code as a cluster.
//! - [`backfill`] runs one job per value of a parameter range.
//! - [`cluster`] runs the coordinator and worker processes and submits jobs to them.
//! - [`maintain`] expires snapshots and removes orphan files of a table.
//! - [`example_data`] generates the TPC-H tables the examples read.
//! - [`output`] prints job reports for people and scripts.
//! - [`progress`] draws a progress bar per stage on a terminal.
//! - [`report`] writes a job's HTML report page from the record its run left.

pub mod backfill;
pub mod check;
pub mod client;
pub mod cluster;
pub mod embedded;
pub mod example_data;
pub mod history;
pub mod maintain;
pub mod output;
pub mod progress;
pub mod report;
