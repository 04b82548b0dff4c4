//! Shuffle through object storage.
//!
//! A map task writes its whole output as **one object per task attempt**: chunks of Arrow
//! IPC streams, one stream per output partition in each chunk, laid end to end (`writer`).
//! The task result lists each stream's byte range as a [`Segment`]; a partition has one per
//! chunk it has rows in. Once a stage is done, the coordinator replaces
//! Ballista's `UnresolvedShuffleExec` placeholders downstream with an
//! [`ObjectStoreShuffleReaderExec`] holding the segments of the winning attempts (`resolve`),
//! which reads them with ranged GETs (`reader`).

mod reader;
mod resolve;
mod writer;

pub use reader::ObjectStoreShuffleReaderExec;
pub use resolve::{StageOutput, for_partition, resolve_shuffles, upstream_stages};
pub use writer::{ShuffleWriteSummary, write_shuffle_output};

use nightshift_proto::v1;

/// A byte range of a shuffle object holding one output partition of one map task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub output_partition: u32,
    /// Object URL.
    pub path: String,
    pub offset: u64,
    pub length: u64,
    pub rows: u64,
}

impl From<&v1::ShuffleSegment> for Segment {
    fn from(s: &v1::ShuffleSegment) -> Self {
        Segment {
            output_partition: s.output_partition,
            path: s.path.clone(),
            offset: s.offset,
            length: s.length,
            rows: s.rows,
        }
    }
}

impl From<&Segment> for v1::ShuffleSegment {
    fn from(s: &Segment) -> Self {
        v1::ShuffleSegment {
            output_partition: s.output_partition,
            path: s.path.clone(),
            offset: s.offset,
            length: s.length,
            rows: s.rows,
        }
    }
}
