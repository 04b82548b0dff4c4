//! The open data files of one task writing a partitioned table, bounded in memory.
//!
//! Iceberg's `FanoutWriter` keeps a Parquet writer open for every table partition a task
//! meets until the task ends, and each holds its unwritten row group in memory: a task
//! writing 350 days held all 350 days (3.4 GiB at TPC-H SF10 under a 2 GiB limit). Here:
//! - rows that arrive sorted by partition (`planner::cluster_by_partition`) close a
//!   partition's file as soon as the rows move past it (the last slice of a batch does not
//!   touch it), so a few files are open at a time and each partition still gets one file;
//! - the open files count against the task's memory pool; when the pool refuses, the files
//!   written least recently are closed until half of that memory is free. Unsorted rows (a
//!   bucket in the partition spec) then leave more, smaller files rather than exceed
//!   the limit.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use iceberg::spec::{DataFile, PartitionKey, Struct};
use iceberg::writer::{CurrentFileStatus, IcebergWriter, IcebergWriterBuilder};
use parquet::file::properties::WriterProperties;

use super::writer::Builder;

type FileWriter = <Builder as IcebergWriterBuilder>::R;

/// Memory an open Parquet file holds besides its row group: one column writer, page buffer
/// and dictionary per column. Measured at 0.4–0.8 MiB for 8 TPC-H columns (350 writers of
/// 2,000 rows each: 272 MiB resident).
const OPEN_FILE_BYTES: usize = 512 << 10;

/// Resident bytes per byte of a row group's encoded size (`in_progress_size`), while it is
/// in memory: values wait unencoded in page buffers and dictionaries hold their own copy.
/// Measured 5.7–6.2 for 8 TPC-H columns (350 writers of 25,000 rows: 219 MiB encoded,
/// 1,364 MiB resident).
const RESIDENT_PER_ENCODED_BYTE: usize = 6;

/// Where a Parquet file's row groups end: ArrowWriter flushes one at `rows` rows (exactly)
/// or when its encoded size passes `bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowGroupLimits {
    pub(crate) rows: usize,
    pub(crate) bytes: Option<usize>,
}

impl RowGroupLimits {
    pub(crate) fn of(props: &WriterProperties) -> Self {
        RowGroupLimits {
            rows: props.max_row_group_row_count().unwrap_or(usize::MAX).max(1),
            bytes: props.max_row_group_bytes(),
        }
    }
}

/// Memory an open file holds, from what the writer reports: `rows` and `written` bytes
/// (flushed row groups plus the in-progress one's encoded size) of its current file.
pub(crate) fn resident_bytes(rows: usize, written: usize, limits: RowGroupLimits) -> usize {
    if rows == 0 {
        return OPEN_FILE_BYTES;
    }
    let unflushed_rows = rows % limits.rows;
    let mut in_progress = (written as u128 * unflushed_rows as u128 / rows as u128) as usize;
    if let Some(cap) = limits.bytes {
        in_progress = in_progress.min(cap);
    }
    OPEN_FILE_BYTES + RESIDENT_PER_ENCODED_BYTE * in_progress
}

/// One open file as the closing rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileUse {
    /// The input slice that last wrote to it (slices are numbered from 1 in input order).
    pub(crate) last_slice: u64,
    pub(crate) resident: usize,
}

/// Which open files to close once slice `slice` (the last of a batch) is written: with
/// `clustered` input, every file it did not touch (the rows have moved past its partition);
/// when the memory pool refused what the files hold (`refused`), also the least recently
/// written (the larger first among equals) until at most half of that memory stays.
pub(crate) fn files_to_close(
    files: &[FileUse],
    slice: u64,
    clustered: bool,
    refused: bool,
) -> Vec<usize> {
    let mut close: Vec<usize> = if clustered {
        (0..files.len())
            .filter(|&i| files[i].last_slice < slice)
            .collect()
    } else {
        Vec::new()
    };
    if refused {
        let total: usize = files.iter().map(|f| f.resident).sum();
        let mut kept: usize = (0..files.len())
            .filter(|i| !close.contains(i))
            .map(|i| files[i].resident)
            .sum();
        let mut candidates: Vec<usize> = (0..files.len()).filter(|i| !close.contains(i)).collect();
        candidates.sort_by_key(|&i| (files[i].last_slice, std::cmp::Reverse(files[i].resident)));
        for i in candidates {
            if kept <= total / 2 {
                break;
            }
            kept -= files[i].resident;
            close.push(i);
        }
    }
    close.sort_unstable();
    close
}

struct OpenFile {
    writer: FileWriter,
    use_: FileUse,
}

/// A task's open data files, one per table partition, closed by [`files_to_close`].
pub(crate) struct OpenFiles {
    builder: Builder,
    /// Builders for some partitions' files instead of `builder`, by the partition's `{:?}`
    /// (a compaction's, whose footers list whose rows each partition holds).
    by_partition: HashMap<String, Builder>,
    open: HashMap<Struct, OpenFile>,
    closed: Vec<DataFile>,
    clustered: bool,
    limits: RowGroupLimits,
    reservation: MemoryReservation,
    slice: u64,
}

impl OpenFiles {
    /// Files for `builder`'s table whose memory counts against `pool` as `consumer`.
    /// `clustered`: the rows arrive partition after partition.
    pub(crate) fn new(
        (builder, by_partition): (Builder, HashMap<String, Builder>),
        limits: RowGroupLimits,
        clustered: bool,
        pool: &Arc<dyn MemoryPool>,
        consumer: String,
    ) -> Self {
        OpenFiles {
            builder,
            by_partition,
            open: HashMap::new(),
            closed: Vec::new(),
            clustered,
            limits,
            reservation: MemoryConsumer::new(consumer)
                .with_can_spill(true)
                .register(pool),
            slice: 0,
        }
    }

    /// Writes one slice of the input, split by partition, each part to its partition's open
    /// file (opened if none).
    pub(crate) async fn write_slice(
        &mut self,
        parts: Vec<(PartitionKey, RecordBatch)>,
    ) -> iceberg::Result<()> {
        self.slice += 1;
        for (key, rows) in parts {
            self.write(key, rows).await?;
        }
        Ok(())
    }

    async fn write(&mut self, key: PartitionKey, rows: RecordBatch) -> iceberg::Result<()> {
        let file = match self.open.get_mut(key.data()) {
            Some(file) => file,
            None => {
                // A partition closed earlier gets a new file, never its old one again: every
                // writer the builder makes shares one file counter (`<attempt prefix>-<n>`),
                // and the prefix is this task attempt's own, so no file another attempt,
                // job or snapshot holds is written over (nothing here deletes a file).
                let builder = if self.by_partition.is_empty() {
                    &self.builder
                } else {
                    self.by_partition
                        .get(&format!("{:?}", key.data()))
                        .unwrap_or(&self.builder)
                };
                let writer = builder.build(Some(key.clone())).await?;
                let use_ = FileUse {
                    last_slice: self.slice,
                    resident: OPEN_FILE_BYTES,
                };
                self.open
                    .entry(key.data().clone())
                    .or_insert(OpenFile { writer, use_ })
            }
        };
        file.writer.write(rows).await?;
        file.use_ = FileUse {
            last_slice: self.slice,
            resident: resident_bytes(
                file.writer.current_row_num(),
                file.writer.current_written_size(),
                self.limits,
            ),
        };
        Ok(())
    }

    /// Ends an input batch: asks the pool for what the open files hold and closes the files
    /// [`files_to_close`] names.
    pub(crate) async fn end_batch(&mut self) -> iceberg::Result<()> {
        let keys: Vec<Struct> = self.open.keys().cloned().collect();
        let uses: Vec<FileUse> = keys.iter().map(|k| self.open[k].use_).collect();
        let held: usize = uses.iter().map(|u| u.resident).sum();
        let refused = self.reservation.try_resize(held).is_err();
        for i in files_to_close(&uses, self.slice, self.clustered, refused) {
            if let Some(mut file) = self.open.remove(&keys[i]) {
                self.closed.extend(file.writer.close().await?);
            }
        }
        let held = self.open.values().map(|f| f.use_.resident).sum();
        self.reservation.resize(held);
        Ok(())
    }

    /// Closes every open file and returns all files written.
    pub(crate) async fn close(mut self) -> iceberg::Result<Vec<DataFile>> {
        for (_, mut file) in self.open.drain() {
            self.closed.extend(file.writer.close().await?);
        }
        self.reservation.free();
        Ok(self.closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RowGroupLimits = RowGroupLimits {
        rows: 1000,
        bytes: None,
    };

    fn at(last_slice: u64, resident: usize) -> FileUse {
        FileUse {
            last_slice,
            resident,
        }
    }

    #[test]
    fn a_file_holds_its_unflushed_rows_share_of_what_it_wrote() {
        assert_eq!(resident_bytes(0, 0, LIMITS), OPEN_FILE_BYTES);
        // 500 rows in the first row group, 4,000 encoded bytes so far.
        assert_eq!(
            resident_bytes(500, 4000, LIMITS),
            OPEN_FILE_BYTES + RESIDENT_PER_ENCODED_BYTE * 4000
        );
        // A row group of 1,000 rows was flushed; 250 rows wait, a fifth of 10,000 bytes.
        assert_eq!(
            resident_bytes(1250, 10_000, LIMITS),
            OPEN_FILE_BYTES + RESIDENT_PER_ENCODED_BYTE * 2000
        );
        // Just flushed: nothing waits.
        assert_eq!(resident_bytes(2000, 16_000, LIMITS), OPEN_FILE_BYTES);
        // A byte limit caps the row group.
        let capped = RowGroupLimits {
            rows: 1000,
            bytes: Some(100),
        };
        assert_eq!(
            resident_bytes(500, 4000, capped),
            OPEN_FILE_BYTES + RESIDENT_PER_ENCODED_BYTE * 100
        );
    }

    #[test]
    fn clustered_rows_close_every_file_the_last_slice_moved_past() {
        let files = [at(3, 10), at(4, 10), at(2, 10), at(4, 10)];
        assert_eq!(files_to_close(&files, 4, true, false), vec![0, 2]);
        // Unsorted rows may come back to any partition: nothing closes while memory allows.
        assert!(files_to_close(&files, 4, false, false).is_empty());
    }

    #[test]
    fn a_refusal_closes_the_least_recently_written_until_half_the_memory_is_free() {
        // 100 bytes held; the oldest go first, the larger first among equals.
        let files = [at(5, 10), at(1, 20), at(1, 30), at(3, 25), at(5, 15)];
        assert_eq!(files_to_close(&files, 5, false, true), vec![1, 2]);
        // Closing the clustered files may already free enough.
        let files = [at(4, 60), at(5, 40)];
        assert_eq!(files_to_close(&files, 5, true, true), vec![0]);
        // The current batch's files close too when the older ones do not free half.
        let files = [at(4, 10), at(5, 60), at(5, 30)];
        assert_eq!(files_to_close(&files, 5, false, true), vec![0, 1]);
    }

    #[test]
    fn nothing_open_closes_nothing() {
        assert!(files_to_close(&[], 1, true, true).is_empty());
    }
}
