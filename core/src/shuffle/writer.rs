//! The map side: run one partition of a stage and write its output partitions to one object.
//!
//! On object storage the output partitions are buffered in local files (LZ4) and uploaded as
//! one object. On a local scratch directory each output partition is written in place as its
//! own uncompressed file: no copy, no compression, no object-store round trip.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom};
use std::sync::Arc;

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
    let mut stream = input.execute(partition, ctx)?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        match partitioner.as_mut() {
            Some(partitioner) => partitioner.partition(batch, |out, part| {
                spill(&mut spills[out], out, &target, &schema, &part)
                    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))
            })?,
            None => spill(&mut spills[0], 0, &target, &schema, &batch)?,
        }
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
