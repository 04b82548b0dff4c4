//! The map side: run one partition of a stage and write its output partitions to one file.
//!
//! Split rows are gathered per output partition into batches of up to the session's batch
//! size ([`rows_per_written_batch`]): split 50 ways, a batch of 8,192 rows leaves pieces of
//! about 160, and every piece written alone is an IPC message to encode and decode, and a
//! batch that small for every operator of the reading stage.
//!
//! The gathered batches are encoded in memory, one IPC stream per output partition, and
//! every [`CHUNK_BYTES`] appended to the task's **one file** as a chunk: the partitions'
//! streams laid end to end, each a [`Segment`] (a partition can have one per chunk). On a
//! local scratch directory that file is the output, `<attempt>/data.arrow`, uncompressed;
//! on object storage it is a local temporary file (LZ4) uploaded as that object. One file
//! per task, not one per output partition: 50 tasks × 50 partitions of files per stage
//! cost more in the file system's inode allocation than in writing their bytes.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::sync::Arc;

use datafusion::arrow::compute::BatchCoalescer;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::CompressionType;
use datafusion::arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::Time;
use datafusion::physical_plan::repartition::BatchPartitioner;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use futures::StreamExt;
use object_store::buffered::BufWriter as ObjectWriter;
use tokio::io::AsyncWriteExt;

use super::Segment;
use crate::error::{CoreError, Result};
use crate::names::SHUFFLE_OBJECT;
use crate::storage::Location;

/// Rows a map task holds back across all its output partitions to write each in batches of
/// [`rows_per_written_batch`]: with rows of ~100 bytes, about 25 MiB.
const GATHERED_ROWS_PER_TASK: usize = 256 * 1024;

/// Fewest rows an output partition gathers before it writes them, however many partitions
/// there are (unless the batch size is smaller).
const MIN_ROWS_PER_WRITTEN_BATCH: usize = 1024;

/// Encoded bytes a map task holds in memory, across its output partitions, before it
/// appends them to its file as a chunk.
const CHUNK_BYTES: usize = 32 << 20;

/// Rows an output partition gathers before it writes them as one batch: the session's
/// `batch_size`, or fewer where `output_partitions` of that many would hold more than
/// [`GATHERED_ROWS_PER_TASK`], but not below [`MIN_ROWS_PER_WRITTEN_BATCH`].
fn rows_per_written_batch(batch_size: usize, output_partitions: usize) -> usize {
    let batch_size = batch_size.max(1);
    (GATHERED_ROWS_PER_TASK / output_partitions.max(1))
        .clamp(MIN_ROWS_PER_WRITTEN_BATCH.min(batch_size), batch_size)
}

/// What a map task wrote.
#[derive(Debug, Clone)]
pub struct ShuffleWriteSummary {
    pub segments: Vec<Segment>,
    pub rows: u64,
    pub bytes: u64,
}

/// An output partition's rows of the current chunk: an IPC stream in memory.
struct EncodedPartition {
    writer: StreamWriter<Vec<u8>>,
    rows: u64,
}

/// The task's output file and the chunks appended to it so far.
struct ChunkedFile {
    file: BufWriter<File>,
    /// Bytes appended so far: the offset of the next segment.
    length: u64,
    /// The current chunk, by output partition.
    encoded: Vec<Option<EncodedPartition>>,
    /// Bytes the current chunk holds.
    encoded_bytes: usize,
    compression: Option<CompressionType>,
    schema: SchemaRef,
    /// Every segment appended.
    segments: Vec<Appended>,
}

/// A stream appended to the task's file: output partition `index`'s rows of one chunk.
struct Appended {
    index: usize,
    offset: u64,
    length: u64,
    rows: u64,
}

impl ChunkedFile {
    fn new(
        file: File,
        partitions: usize,
        schema: SchemaRef,
        compression: Option<CompressionType>,
    ) -> Self {
        ChunkedFile {
            file: BufWriter::new(file),
            length: 0,
            encoded: (0..partitions).map(|_| None).collect(),
            encoded_bytes: 0,
            compression,
            schema,
            segments: Vec::new(),
        }
    }

    /// Encodes `batch` into output partition `index`'s stream of the current chunk, and
    /// appends the chunk once it holds [`CHUNK_BYTES`].
    fn write(&mut self, index: usize, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let slot = &mut self.encoded[index];
        if slot.is_none() {
            let options = IpcWriteOptions::default()
                .try_with_compression(self.compression)
                .map_err(DataFusionError::from)?;
            let writer = StreamWriter::try_new_with_options(Vec::new(), &self.schema, options)
                .map_err(DataFusionError::from)?;
            self.encoded_bytes += writer.get_ref().len();
            *slot = Some(EncodedPartition { writer, rows: 0 });
        }
        let partition = slot.as_mut().expect("created above");
        let before = partition.writer.get_ref().len();
        partition
            .writer
            .write(batch)
            .map_err(DataFusionError::from)?;
        partition.rows += batch.num_rows() as u64;
        self.encoded_bytes += partition.writer.get_ref().len() - before;
        if self.encoded_bytes >= CHUNK_BYTES {
            self.append_chunk()?;
        }
        Ok(())
    }

    /// Appends the current chunk's streams to the file, each as a segment.
    fn append_chunk(&mut self) -> Result<()> {
        for (index, slot) in self.encoded.iter_mut().enumerate() {
            let Some(mut partition) = slot.take() else {
                continue;
            };
            partition.writer.finish().map_err(DataFusionError::from)?;
            let bytes = partition
                .writer
                .into_inner()
                .map_err(DataFusionError::from)?;
            self.file
                .write_all(&bytes)
                .map_err(|e| CoreError::io("write shuffle file", e))?;
            let length = bytes.len() as u64;
            self.segments.push(Appended {
                index,
                offset: self.length,
                length,
                rows: partition.rows,
            });
            self.length += length;
        }
        self.encoded_bytes = 0;
        Ok(())
    }

    /// Appends what is left and flushes the file.
    fn finish(mut self) -> Result<(File, u64, Vec<Appended>)> {
        self.append_chunk()?;
        let file = self
            .file
            .into_inner()
            .map_err(|e| CoreError::io("flush shuffle file", e.into_error()))?;
        Ok((file, self.length, self.segments))
    }
}

/// Runs partition `partition` of `input`, splits it by `partitioning` (or keeps it whole as
/// output partition `partition` when `None`) and writes it as `<attempt_dir>/data.arrow`.
pub async fn write_shuffle_output(
    input: Arc<dyn ExecutionPlan>,
    partition: usize,
    partitioning: Option<Partitioning>,
    attempt_dir: &Location,
    ctx: Arc<TaskContext>,
) -> Result<ShuffleWriteSummary> {
    let schema = input.schema();
    let output_count = partitioning
        .as_ref()
        .map_or(1, Partitioning::partition_count);
    let object = attempt_dir.join(SHUFFLE_OBJECT);
    let local_path = object.local_path();
    let (file, compression) = match &local_path {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| CoreError::io(format!("create {}", dir.display()), e))?;
            }
            // Created, never opened over an existing file: the path is in this execution's
            // own attempt directory (`map-<p>/attempt-<a>-<nonce>`, a fresh nonce per
            // execution) under the scratch root, so no other attempt's output, and no table
            // file a snapshot references, can be truncated here; a clash fails the task.
            let file = File::create_new(path)
                .map_err(|e| CoreError::io(format!("create {}", path.display()), e))?;
            (file, None)
        }
        None => (
            tempfile::tempfile().map_err(|e| CoreError::io("create shuffle spill file", e))?,
            Some(CompressionType::LZ4_FRAME),
        ),
    };
    let mut out = ChunkedFile::new(file, output_count, schema.clone(), compression);
    let mut partitioner = match partitioning {
        Some(p) => Some(BatchPartitioner::try_new(p, Time::new(), partition, 1)?),
        None => None,
    };
    let gathered_rows = rows_per_written_batch(ctx.session_config().batch_size(), output_count);
    let mut gathering: Vec<BatchCoalescer> = (0..output_count)
        .map(|_| BatchCoalescer::new(schema.clone(), gathered_rows))
        .collect();
    let mut stream = input.execute(partition, ctx)?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        match partitioner.as_mut() {
            Some(partitioner) => partitioner.partition(batch, |index, piece| {
                gathering[index].push_batch(piece)?;
                write_gathered(&mut gathering[index], &mut out, index)
                    .map_err(|e| DataFusionError::External(Box::new(e)))
            })?,
            // Whole batches, as the plan made them.
            None => out.write(0, &batch)?,
        }
    }
    for (index, gathered) in gathering.iter_mut().enumerate() {
        gathered
            .finish_buffered_batch()
            .map_err(DataFusionError::from)?;
        write_gathered(gathered, &mut out, index)?;
    }
    let (file, length, appended) = out.finish()?;
    if local_path.is_none() && length > 0 {
        upload(file, &object).await?;
    }
    // Output partition of a stream: kept whole, the task's own partition.
    let output_index = |i: usize| {
        if output_count == 1 && partitioner.is_none() {
            partition
        } else {
            i
        }
    };
    let path = object.as_url_string();
    let segments: Vec<Segment> = appended
        .into_iter()
        .map(|appended| Segment {
            output_partition: output_index(appended.index) as u32,
            path: path.clone(),
            offset: appended.offset,
            length: appended.length,
            rows: appended.rows,
        })
        .collect();
    Ok(ShuffleWriteSummary {
        rows: segments.iter().map(|s| s.rows).sum(),
        bytes: length,
        segments,
    })
}

/// Writes the batches `gathered` has completed to output partition `index`.
fn write_gathered(
    gathered: &mut BatchCoalescer,
    out: &mut ChunkedFile,
    index: usize,
) -> Result<()> {
    while let Some(batch) = gathered.next_completed_batch() {
        out.write(index, &batch)?;
    }
    Ok(())
}

/// Uploads the task's local file as `object`.
async fn upload(mut file: File, object: &Location) -> Result<()> {
    file.seek(SeekFrom::Start(0))
        .map_err(|e| CoreError::io("rewind shuffle spill file", e))?;
    let (store, key) = object.store()?;
    let mut writer = ObjectWriter::new(store, key);
    let mut file = tokio::fs::File::from_std(file);
    tokio::io::copy(&mut file, &mut writer)
        .await
        .map_err(|e| CoreError::io(format!("upload shuffle output {object}"), e))?;
    writer
        .shutdown()
        .await
        .map_err(|e| CoreError::io(format!("complete shuffle output {object}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::ipc::reader::StreamReader;
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::physical_expr::expressions::col;
    use datafusion::prelude::SessionContext;
    use std::path::Path;

    #[test]
    fn an_output_partition_is_written_in_batches_of_the_batch_size_up_to_a_budget() {
        assert_eq!(rows_per_written_batch(8192, 1), 8192);
        assert_eq!(rows_per_written_batch(8192, 32), 8192);
        assert_eq!(rows_per_written_batch(8192, 50), 5242);
        assert_eq!(rows_per_written_batch(8192, 10_000), 1024);
        assert_eq!(rows_per_written_batch(100, 10_000), 100);
        assert_eq!(rows_per_written_batch(0, 0), 1);
    }

    /// Writes `batches` of keys `0..` split four ways by key into a temporary directory and
    /// reads every segment back: (summary, batches read per segment, every key read).
    async fn write_and_read(
        batches: usize,
        rows: usize,
    ) -> (ShuffleWriteSummary, Vec<usize>, Vec<i64>) {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let input: Vec<RecordBatch> = (0..batches)
            .map(|b| {
                let keys = ((b * rows) as i64..((b + 1) * rows) as i64).collect::<Int64Array>();
                RecordBatch::try_new(schema.clone(), vec![Arc::new(keys)]).unwrap()
            })
            .collect();
        let input = MemorySourceConfig::try_new_exec(&[input], schema.clone(), None).unwrap();
        let partitioning = Partitioning::Hash(vec![col("k", &schema).unwrap()], 4);
        let dir = tempfile::tempdir().unwrap();
        let location = Location::parse(dir.path().to_str().unwrap(), Path::new("/")).unwrap();
        let ctx = SessionContext::new().task_ctx();
        let written = write_shuffle_output(input, 0, Some(partitioning), &location, ctx)
            .await
            .unwrap();
        let bytes = std::fs::read(dir.path().join(SHUFFLE_OBJECT)).unwrap();
        assert_eq!(
            bytes.len() as u64,
            written.bytes,
            "the file is the segments"
        );
        let mut batches_read = Vec::new();
        let mut keys = Vec::new();
        for segment in &written.segments {
            let range = segment.offset as usize..(segment.offset + segment.length) as usize;
            let reader = StreamReader::try_new(&bytes[range], None).unwrap();
            let batches = reader.collect::<std::result::Result<Vec<_>, _>>().unwrap();
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            assert_eq!(rows as u64, segment.rows);
            batches_read.push(batches.len());
            for batch in &batches {
                let column = batch.column(0).as_any().downcast_ref::<Int64Array>();
                keys.extend(column.unwrap().values().iter().copied());
            }
        }
        keys.sort();
        (written, batches_read, keys)
    }

    #[tokio::test]
    async fn split_rows_are_gathered_into_whole_batches_per_output_partition() {
        // Three input batches of 8,192 rows split four ways: each output partition gets
        // a piece of every batch (about 2,048 rows) and writes them as one batch of ~6,144.
        let (written, batches_read, keys) = write_and_read(3, 8192).await;
        assert_eq!(written.rows, 3 * 8192);
        assert_eq!(written.segments.len(), 4, "one segment per partition");
        assert_eq!(batches_read, vec![1; 4], "one batch per segment");
        assert_eq!(keys, (0..3 * 8192).collect::<Vec<i64>>());
    }

    #[tokio::test]
    async fn a_task_writes_one_file_in_chunks_each_a_segment_per_partition() {
        // 48 MiB of keys: more than one chunk, so each partition has a segment per chunk,
        // all in the one file.
        let rows = CHUNK_BYTES * 3 / 2 / 8;
        let (written, _, keys) = write_and_read(rows / 8192, 8192).await;
        assert_eq!(written.rows as usize, rows / 8192 * 8192);
        assert_eq!(written.segments.len(), 8, "two chunks of four partitions");
        let mut partitions: Vec<u32> = written
            .segments
            .iter()
            .map(|s| s.output_partition)
            .collect();
        partitions.sort();
        assert_eq!(partitions, vec![0, 0, 1, 1, 2, 2, 3, 3]);
        assert!(
            written
                .segments
                .windows(2)
                .all(|w| w[0].offset + w[0].length == w[1].offset)
        );
        assert_eq!(keys, (0..written.rows as i64).collect::<Vec<i64>>());
    }
}
