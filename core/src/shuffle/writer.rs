//! The map side: run one partition of a stage and write its output partitions to one object.
//!
//! On object storage the output partitions are buffered in local files (LZ4) and uploaded as
//! one object. On a local scratch directory each output partition is written in place as its
//! own uncompressed file: no copy, no compression, no object-store round trip.
//!
//! Split rows are gathered per output partition into batches of up to the session's batch
//! size before they are written ([`rows_per_written_batch`]): split 50 ways, a batch of
//! 8,192 rows leaves pieces of about 160, and every piece written alone is an IPC message
//! to encode and decode, and a batch that small for every operator of the reading stage.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom};
use std::sync::Arc;

use datafusion::arrow::compute::BatchCoalescer;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::CompressionType;
use datafusion::arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::Time;
use datafusion::physical_plan::repartition::BatchPartitioner;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use futures::StreamExt;
use object_store::buffered::BufWriter as ObjectWriter;
use tokio::io::AsyncWriteExt;

use super::Segment;
use crate::error::{CoreError, Result};
use crate::storage::Location;

/// Rows a map task holds back across all its output partitions to write each in batches of
/// [`rows_per_written_batch`]: with rows of ~100 bytes, about 25 MiB.
const GATHERED_ROWS_PER_TASK: usize = 256 * 1024;

/// Fewest rows an output partition gathers before it writes them, however many partitions
/// there are (unless the batch size is smaller).
const MIN_ROWS_PER_WRITTEN_BATCH: usize = 1024;

/// Rows an output partition gathers before it writes them as one batch: the session's
/// `batch_size`, or fewer where `output_partitions` of that many would hold more than
/// [`GATHERED_ROWS_PER_TASK`], but not below [`MIN_ROWS_PER_WRITTEN_BATCH`].
pub fn rows_per_written_batch(batch_size: usize, output_partitions: usize) -> usize {
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

/// One output partition being spilled to a local temporary file.
struct PartitionSpill {
    writer: StreamWriter<BufWriter<File>>,
    rows: u64,
}

/// Where a map task's output partitions go before they are described as segments.
enum SpillTarget {
    /// Temporary files, uploaded as one object at the end.
    Upload,
    /// Files `data-<i>.arrow` in this local directory, which are the output.
    InPlace(std::path::PathBuf),
}

/// Runs partition `partition` of `input`, splits it by `partitioning` (or keeps it whole as
/// output partition `partition` when `None`) and uploads it as `<attempt_dir>/data.arrow`.
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
    let mut spills: Vec<Option<PartitionSpill>> = (0..output_count).map(|_| None).collect();
    let target = match attempt_dir.local_path() {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| CoreError::io(format!("create {}", dir.display()), e))?;
            SpillTarget::InPlace(dir)
        }
        None => SpillTarget::Upload,
    };
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
            Some(partitioner) => partitioner.partition(batch, |out, part| {
                gathering[out].push_batch(part)?;
                spill_gathered(&mut gathering[out], &mut spills[out], out, &target, &schema)
                    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))
            })?,
            // Whole batches, as the plan made them.
            None => spill(&mut spills[0], 0, &target, &schema, &batch)?,
        }
    }
    for (out, gathered) in gathering.iter_mut().enumerate() {
        gathered
            .finish_buffered_batch()
            .map_err(datafusion::error::DataFusionError::from)?;
        spill_gathered(gathered, &mut spills[out], out, &target, &schema)?;
    }
    let output_index = |i: usize| {
        if output_count == 1 && partitioner.is_none() {
            partition
        } else {
            i
        }
    };
    match target {
        SpillTarget::Upload => upload(spills, &attempt_dir.join("data.arrow"), output_index).await,
        SpillTarget::InPlace(_) => finish_in_place(spills, attempt_dir, output_index),
    }
}

/// Writes the batches `gathered` has completed to output partition `index`.
fn spill_gathered(
    gathered: &mut BatchCoalescer,
    slot: &mut Option<PartitionSpill>,
    index: usize,
    target: &SpillTarget,
    schema: &SchemaRef,
) -> Result<()> {
    while let Some(batch) = gathered.next_completed_batch() {
        spill(slot, index, target, schema, &batch)?;
    }
    Ok(())
}

fn spill(
    slot: &mut Option<PartitionSpill>,
    index: usize,
    target: &SpillTarget,
    schema: &SchemaRef,
    batch: &RecordBatch,
) -> Result<()> {
    if batch.num_rows() == 0 {
        return Ok(());
    }
    if slot.is_none() {
        let (file, compression) = match target {
            SpillTarget::Upload => (
                tempfile::tempfile().map_err(|e| CoreError::io("create shuffle spill file", e))?,
                Some(CompressionType::LZ4_FRAME),
            ),
            SpillTarget::InPlace(dir) => {
                let path = dir.join(in_place_name(index));
                let file = File::create(&path)
                    .map_err(|e| CoreError::io(format!("create {}", path.display()), e))?;
                (file, None)
            }
        };
        let options = IpcWriteOptions::default()
            .try_with_compression(compression)
            .map_err(datafusion::error::DataFusionError::from)?;
        let writer = StreamWriter::try_new_with_options(BufWriter::new(file), schema, options)
            .map_err(datafusion::error::DataFusionError::from)?;
        *slot = Some(PartitionSpill { writer, rows: 0 });
    }
    let spill = slot.as_mut().expect("created above");
    spill
        .writer
        .write(batch)
        .map_err(datafusion::error::DataFusionError::from)?;
    spill.rows += batch.num_rows() as u64;
    Ok(())
}

fn in_place_name(index: usize) -> String {
    format!("data-{index}.arrow")
}

/// Finishes the in-place files of a local scratch directory; each is one segment.
fn finish_in_place(
    spills: Vec<Option<PartitionSpill>>,
    attempt_dir: &Location,
    output_index: impl Fn(usize) -> usize,
) -> Result<ShuffleWriteSummary> {
    let mut segments = Vec::new();
    let mut rows = 0u64;
    let mut bytes = 0u64;
    for (i, spill) in spills.into_iter().enumerate() {
        let Some(mut spill) = spill else { continue };
        spill
            .writer
            .finish()
            .map_err(datafusion::error::DataFusionError::from)?;
        let file = spill
            .writer
            .into_inner()
            .map_err(datafusion::error::DataFusionError::from)?
            .into_inner()
            .map_err(|e| CoreError::io("flush shuffle file", e.into_error()))?;
        let length = file
            .metadata()
            .map_err(|e| CoreError::io("size shuffle file", e))?
            .len();
        segments.push(Segment {
            output_partition: output_index(i) as u32,
            path: attempt_dir.join(&in_place_name(i)).as_url_string(),
            offset: 0,
            length,
            rows: spill.rows,
        });
        rows += spill.rows;
        bytes += length;
    }
    Ok(ShuffleWriteSummary {
        segments,
        rows,
        bytes,
    })
}

/// Concatenates the spilled streams into one object and records each one's byte range.
async fn upload(
    spills: Vec<Option<PartitionSpill>>,
    object: &Location,
    output_index: impl Fn(usize) -> usize,
) -> Result<ShuffleWriteSummary> {
    let mut segments = Vec::new();
    let mut offset = 0u64;
    let mut rows = 0u64;
    let mut out: Option<ObjectWriter> = None;
    for (i, spill) in spills.into_iter().enumerate() {
        let Some(mut spill) = spill else { continue };
        spill
            .writer
            .finish()
            .map_err(datafusion::error::DataFusionError::from)?;
        let mut file = spill
            .writer
            .into_inner()
            .map_err(datafusion::error::DataFusionError::from)?
            .into_inner()
            .map_err(|e| CoreError::io("flush shuffle spill file", e.into_error()))?;
        let length = file
            .seek(SeekFrom::End(0))
            .map_err(|e| CoreError::io("size shuffle spill file", e))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| CoreError::io("rewind shuffle spill file", e))?;
        if out.is_none() {
            let (store, key) = object.store()?;
            out = Some(ObjectWriter::new(store, key));
        }
        let writer = out.as_mut().expect("created above");
        let mut file = tokio::fs::File::from_std(file);
        tokio::io::copy(&mut file, writer)
            .await
            .map_err(|e| CoreError::io(format!("upload shuffle output {object}"), e))?;
        segments.push(Segment {
            output_partition: output_index(i) as u32,
            path: object.as_url_string(),
            offset,
            length,
            rows: spill.rows,
        });
        offset += length;
        rows += spill.rows;
    }
    if let Some(mut writer) = out {
        writer
            .shutdown()
            .await
            .map_err(|e| CoreError::io(format!("complete shuffle output {object}"), e))?;
    }
    Ok(ShuffleWriteSummary {
        segments,
        rows,
        bytes: offset,
    })
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

    #[tokio::test]
    async fn split_rows_are_gathered_into_whole_batches_per_output_partition() {
        // Three input batches of 8,192 rows split four ways: each output partition gets
        // a piece of every batch (about 2,048 rows) and writes them as one batch of ~6,144.
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let batches: Vec<RecordBatch> = (0..3)
            .map(|b| {
                let keys = (b * 8192..(b + 1) * 8192).collect::<Int64Array>();
                RecordBatch::try_new(schema.clone(), vec![Arc::new(keys)]).unwrap()
            })
            .collect();
        let input = MemorySourceConfig::try_new_exec(&[batches], schema.clone(), None).unwrap();
        let partitioning = Partitioning::Hash(vec![col("k", &schema).unwrap()], 4);
        let dir = tempfile::tempdir().unwrap();
        let location = Location::parse(dir.path().to_str().unwrap(), Path::new("/")).unwrap();
        let ctx = SessionContext::new().task_ctx();

        let written = write_shuffle_output(input, 0, Some(partitioning), &location, ctx)
            .await
            .unwrap();

        assert_eq!(written.rows, 3 * 8192);
        assert_eq!(written.segments.len(), 4);
        let mut keys = Vec::new();
        for segment in &written.segments {
            let path = dir
                .path()
                .join(in_place_name(segment.output_partition as usize));
            let reader = StreamReader::try_new(File::open(&path).unwrap(), None).unwrap();
            let batches = reader.collect::<std::result::Result<Vec<_>, _>>().unwrap();
            assert_eq!(batches.len(), 1, "one batch in {}", path.display());
            assert_eq!(batches[0].num_rows() as u64, segment.rows);
            let column = batches[0].column(0).as_any().downcast_ref::<Int64Array>();
            keys.extend(column.unwrap().values().iter().copied());
        }
        keys.sort();
        assert_eq!(keys, (0..3 * 8192).collect::<Vec<i64>>());
    }
}
