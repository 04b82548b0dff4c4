//! Worker side of a table write: run one partition of the final stage and write Iceberg data
//! files for it. The files are not visible to readers until the coordinator commits them.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use futures::StreamExt;
use iceberg::arrow::{FieldMatchMode, schema_to_arrow_schema};

use super::partition_values::PartitionSplitter;
use iceberg::spec::{
    DataFile, DataFileFormat, FormatVersion, PartitionSpec, Schema, serialize_data_file_to_json,
};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::file_writer::location_generator::DefaultFileNameGenerator;
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::partitioning::unpartitioned_writer::UnpartitionedWriter;
use nightshift_proto::v1::TableOutput;
use parquet::file::properties::WriterProperties;

use super::files::PartitionPathGenerator;
use super::open_files::{OpenFiles, RowGroupLimits};
use super::rejects::Quarantine;
use crate::checks::RowCheckCounter;
use crate::error::{CoreError, Result};

/// What a final-stage task wrote.
#[derive(Debug, Clone)]
pub struct TableWriteSummary {
    /// Data files, serialized with `serialize_data_file_to_json`.
    pub data_files_json: Vec<String>,
    pub rows: u64,
    pub bytes: u64,
    /// Rows that failed each of the task's row checks (for a quarantining check: the rows
    /// it set aside).
    pub checks: Vec<nightshift_proto::v1::CheckOutcome>,
    /// Data files of the rejects table (rows set aside by quarantining checks).
    pub reject_files_json: Vec<String>,
    pub rejected_rows: u64,
    /// The target's partitions of the rows set aside (see `FilesWritten`).
    pub set_aside_partitions_json: Vec<String>,
}

/// Decoded table description from a task.
pub(crate) struct TableTarget {
    pub(crate) schema: Arc<Schema>,
    pub(crate) spec: Arc<PartitionSpec>,
    pub(crate) format_version: FormatVersion,
    pub(crate) arrow_schema: SchemaRef,
}

impl TableTarget {
    pub(crate) fn from_task(out: &TableOutput) -> Result<Self> {
        let bad =
            |what: &str, e: serde_json::Error| CoreError::Protocol(format!("task {what}: {e}"));
        let schema: Schema =
            serde_json::from_str(&out.schema_json).map_err(|e| bad("schema", e))?;
        let spec: PartitionSpec =
            serde_json::from_str(&out.partition_spec_json).map_err(|e| bad("partition spec", e))?;
        let format_version = match out.format_version {
            1 => FormatVersion::V1,
            3 => FormatVersion::V3,
            _ => FormatVersion::V2,
        };
        let arrow_schema = Arc::new(schema_to_arrow_schema(&schema)?);
        Ok(TableTarget {
            schema: Arc::new(schema),
            spec: Arc::new(spec),
            format_version,
            arrow_schema,
        })
    }
}

pub(crate) type Builder =
    DataFileWriterBuilder<ParquetWriterBuilder, PartitionPathGenerator, DefaultFileNameGenerator>;

/// Either writer kind, as iceberg-datafusion's private `TaskWriter` does.
pub(crate) enum PartitionedWriter {
    Unpartitioned(Box<UnpartitionedWriter<Builder>>),
    Fanout(
        Box<OpenFiles>,
        Box<PartitionSplitter>,
        /// The partition fields' source columns, by name: a batch of unsorted input is
        /// ordered by them first (input clustered by them is already).
        Option<Vec<String>>,
    ),
}

/// Rows the partition splitter sees at once, after a batch is ordered by the partition
/// fields' source columns: few partition values in each slice, so the splitter's one
/// mask per value stays cheap (it scans the whole slice for each value it holds).
const SPLIT_SLICE_ROWS: usize = 512;

impl PartitionedWriter {
    pub(crate) async fn write(&mut self, batch: RecordBatch) -> iceberg::Result<()> {
        match self {
            PartitionedWriter::Unpartitioned(w) => w.write(batch).await,
            PartitionedWriter::Fanout(w, splitter, order_by) => {
                let batch = match order_by {
                    Some(sources) => ordered_by(&batch, sources)?,
                    None => batch,
                };
                let mut start = 0;
                while start < batch.num_rows() {
                    let len = SPLIT_SLICE_ROWS.min(batch.num_rows() - start);
                    w.write_slice(splitter.split(&batch.slice(start, len))?)
                        .await?;
                    start += len;
                }
                w.end_batch().await
            }
        }
    }

    pub(crate) async fn close(self) -> iceberg::Result<Vec<DataFile>> {
        match self {
            PartitionedWriter::Unpartitioned(w) => w.close().await,
            PartitionedWriter::Fanout(w, ..) => w.close().await,
        }
    }
}

/// Runs partition `partition` of `input` and writes its rows as data files named
/// `<file_prefix>-<n>.parquet` under the table's data location.
pub async fn write_data_files(
    input: Arc<dyn ExecutionPlan>,
    partition: usize,
    out: &TableOutput,
    file_prefix: String,
    ctx: Arc<TaskContext>,
) -> Result<TableWriteSummary> {
    let target = TableTarget::from_task(out)?;
    let layout = WriteLayout {
        clustered: clustered_by_partition(&input, &target),
        pool: ctx.memory_pool().clone(),
    };
    let stream = input.execute(partition, ctx)?;
    write_to_target(stream, &target, out, file_prefix, layout).await
}

/// How a task's rows reach its writer.
pub struct WriteLayout {
    /// The rows arrive sorted by partition (a partition passed is not met again).
    pub clustered: bool,
    /// The memory pool the open files count against.
    pub pool: Arc<dyn datafusion::execution::memory_pool::MemoryPool>,
}

impl WriteLayout {
    /// Unsorted rows, open files bounded only by the process's memory.
    pub fn unbounded() -> Self {
        WriteLayout {
            clustered: false,
            pool: Arc::new(datafusion::execution::memory_pool::UnboundedMemoryPool::default()),
        }
    }
}

/// Whether `input` yields its rows partition after partition: sorted by a key of each of
/// `target`'s partition fields in turn, each key reading its field's source column, and
/// every field one the planner sorts by (`planner::clustering_fields`: no bucket, a
/// truncate only last). Then the writer can close a partition's file once the rows move
/// past it.
fn clustered_by_partition(input: &Arc<dyn ExecutionPlan>, target: &TableTarget) -> bool {
    let Some(ordering) = input.properties().output_ordering() else {
        return false;
    };
    let Some(fields) = target
        .spec
        .fields()
        .iter()
        .map(|field| {
            Some(nightshift_spec::PartitionField {
                column: target.schema.name_by_field_id(field.source_id)?.to_string(),
                transform: super::layout::from_iceberg(field.transform)?,
            })
        })
        .collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    !fields.is_empty()
        && crate::planner::clustering_fields(&fields) == fields.len()
        && fields.len() <= ordering.len()
        && fields.iter().zip(ordering.iter()).all(|(field, key)| {
            datafusion::physical_expr::utils::collect_columns(&key.expr)
                .iter()
                .any(|column| column.name() == field.column)
        })
}

/// `batch` ordered by the columns `by` (by name; a name it lacks is skipped). Rows of one
/// partition value then sit together for every transform that keeps order (identity, time
/// units, truncate); for a bucket the order only costs the sort.
fn ordered_by(batch: &RecordBatch, by: &[String]) -> iceberg::Result<RecordBatch> {
    let columns: Vec<arrow::compute::SortColumn> = by
        .iter()
        .filter_map(|name| batch.column_by_name(name))
        .map(|values| arrow::compute::SortColumn {
            values: values.clone(),
            options: None,
        })
        .collect();
    if columns.is_empty() || batch.num_rows() <= SPLIT_SLICE_ROWS {
        return Ok(batch.clone());
    }
    let arrow_err = |e: arrow::error::ArrowError| {
        iceberg::Error::new(iceberg::ErrorKind::Unexpected, e.to_string())
    };
    let indices = arrow::compute::lexsort_to_indices(&columns, None).map_err(arrow_err)?;
    arrow::compute::take_record_batch(batch, &indices).map_err(arrow_err)
}

/// Writes the rows of `stream` as data files named `<file_prefix>-<n>.parquet` under the
/// table's data location, counting the row checks `out` carries.
pub async fn write_batches<E>(
    stream: impl futures::Stream<Item = std::result::Result<RecordBatch, E>> + Unpin,
    out: &TableOutput,
    file_prefix: String,
    layout: WriteLayout,
) -> Result<TableWriteSummary>
where
    CoreError: From<E>,
{
    let target = TableTarget::from_task(out)?;
    write_to_target(stream, &target, out, file_prefix, layout).await
}

/// [`write_batches`] for the table `out` describes, already decoded as `target`.
async fn write_to_target<E>(
    mut stream: impl futures::Stream<Item = std::result::Result<RecordBatch, E>> + Unpin,
    target: &TableTarget,
    out: &TableOutput,
    file_prefix: String,
    layout: WriteLayout,
) -> Result<TableWriteSummary>
where
    CoreError: From<E>,
{
    let target_partitions = match target.spec.is_unpartitioned() {
        true => None,
        false => Some(PartitionSplitter::try_new(
            target.schema.clone(),
            target.spec.clone(),
        )?),
    };
    let mut quarantine = Quarantine::new(
        &out.checks,
        &target.arrow_schema,
        out.rejects.as_ref(),
        &file_prefix,
        target_partitions,
    )?;
    let mut writer = new_writer(target, out, file_prefix, layout)?;
    let counted: Vec<_> = out
        .checks
        .iter()
        .filter(|c| !c.quarantine)
        .cloned()
        .collect();
    let mut checks = RowCheckCounter::new(&counted, &target.arrow_schema)?;
    let mut rows = 0u64;
    while let Some(batch) = stream.next().await {
        let mut batch = conform_batch(&batch?, &target.arrow_schema)?;
        if batch.num_rows() == 0 {
            continue;
        }
        if let Some(quarantine) = &mut quarantine {
            batch = quarantine.set_aside(batch).await?;
            if batch.num_rows() == 0 {
                continue;
            }
        }
        refuse_unnameable_partition_values(&batch, target)?;
        refuse_decimals_past_their_precision(&batch)?;
        rows += batch.num_rows() as u64;
        checks.observe(&batch)?;
        writer.write(batch).await?;
    }
    let files = writer.close().await?;
    let bytes = files.iter().map(DataFile::file_size_in_bytes).sum();
    let data_files_json = serialized(target, files)?;
    let mut outcomes = checks.finish();
    let rejects = match quarantine {
        Some(quarantine) => Some(quarantine.finish().await?),
        None => None,
    };
    let (reject_files_json, rejected_rows, set_aside_partitions_json) = match rejects {
        Some(rejects) => {
            outcomes.extend(rejects.checks);
            (
                rejects.data_files_json,
                rejects.rows,
                rejects.partitions_json,
            )
        }
        None => (Vec::new(), 0, Vec::new()),
    };
    Ok(TableWriteSummary {
        data_files_json,
        rows,
        bytes,
        checks: outcomes,
        reject_files_json,
        rejected_rows,
        set_aside_partitions_json,
    })
}

/// Fails on an identity partition value that iceberg-rust 0.10 cannot name: a timestamp
/// with time zone before 1970 that is not a whole second (or nanosecond-precision one not
/// a whole second), whose conversion to text (the partition directory, the snapshot
/// summary) panics on a negative remainder. The error names the column and the value, and
/// nothing is written; `day()`, `hour()` or a timestamp without zone name such values.
fn refuse_unnameable_partition_values(batch: &RecordBatch, target: &TableTarget) -> Result<()> {
    use iceberg::spec::{PrimitiveType, Transform, Type};
    for field in target.spec.fields() {
        if field.transform != Transform::Identity {
            continue;
        }
        let Some(source) = target.schema.field_by_id(field.source_id) else {
            continue;
        };
        let per_second = match *source.field_type {
            Type::Primitive(PrimitiveType::Timestamptz) => 1_000_000,
            Type::Primitive(PrimitiveType::TimestamptzNs) => 1_000_000_000,
            Type::Primitive(PrimitiveType::Float | PrimitiveType::Double) => {
                refuse_non_finite_partition_values(batch, &source.name)?;
                continue;
            }
            _ => continue,
        };
        let Some(column) = batch.column_by_name(&source.name) else {
            continue;
        };
        let Ok(values) = arrow::compute::cast(column, &arrow::datatypes::DataType::Int64) else {
            continue;
        };
        let values = values
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .expect("cast to Int64");
        if let Some(row) = values
            .iter()
            .position(|v| v.is_some_and(|v| v < 0 && v % per_second != 0))
        {
            let shown = arrow::util::display::array_value_to_string(column, row)
                .unwrap_or_else(|_| values.value(row).to_string());
            return Err(CoreError::Task {
                message: format!(
                    "column `{}`: the value {shown} cannot be an identity partition value: \
                     Iceberg's Rust library cannot name a timestamp with time zone before 1970 \
                     that is not a whole second; partition by day({0}) or hour({0}), or by a \
                     timestamp without zone",
                    source.name
                ),
                retryable: false,
            });
        }
    }
    Ok(())
}

/// An identity partition value of a float column must be finite: a data file's partition
/// travels to the committer as JSON, which has no NaN or infinity, and came out as null,
/// so the manifest named the NaN and infinite rows' files the null partition (an
/// `overwrite_partitions` then replaced the null rows' partition with them, and readers
/// pruned the rows away from `f = 'inf'` and `isnan(f)`).
fn refuse_non_finite_partition_values(batch: &RecordBatch, name: &str) -> Result<()> {
    let Some(column) = batch.column_by_name(name) else {
        return Ok(());
    };
    let Ok(values) = arrow::compute::cast(column, &arrow::datatypes::DataType::Float64) else {
        return Ok(());
    };
    let values = values
        .as_any()
        .downcast_ref::<arrow::array::Float64Array>()
        .expect("cast to Float64");
    match values
        .iter()
        .position(|v| v.is_some_and(|v| !v.is_finite()))
    {
        None => Ok(()),
        Some(row) => Err(CoreError::Task {
            message: format!(
                "column `{name}`: the value {} cannot be an identity partition value: a \
                 partition value must be finite (NaN and infinity cannot be written to the \
                 table's manifests here); map it first (e.g. CASE WHEN isnan({name}) THEN \
                 NULL ELSE {name} END) or partition by another column",
                values.value(row)
            ),
            retryable: false,
        }),
    }
}

/// A decimal value must fit its column's precision: DataFusion's `SUM` and arithmetic on
/// decimals do not check it (two `decimal(38, 0)` values of 38 nines summed to a 39-digit
/// value, and `6e19 * 2` in a `decimal(38, 18)` too), and such a value was published where
/// Spark and Trino cannot read it (or read it as another number). The task fails naming
/// the column, the row and the value.
fn refuse_decimals_past_their_precision(batch: &RecordBatch) -> Result<()> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{DataType, Decimal128Type, DecimalType};
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let DataType::Decimal128(precision, scale) = field.data_type() else {
            continue;
        };
        let values = column.as_primitive::<Decimal128Type>();
        let past = values.iter().position(|v| {
            v.is_some_and(|v| !Decimal128Type::is_valid_decimal_precision(v, *precision))
        });
        if let Some(row) = past {
            return Err(CoreError::Task {
                message: format!(
                    "column `{}` row {}: the value {} has more digits than decimal({precision}, {scale}) holds (an overflow in the SQL, e.g. a SUM); cast to a wider decimal or round it",
                    field.name(),
                    row + 1,
                    decimal_text(values.value(row), *scale)
                ),
                retryable: false,
            });
        }
    }
    Ok(())
}

/// `value` of a decimal with `scale`, every digit shown (arrow's formatter cuts a value to
/// the column's precision, which is what is wrong with it here).
fn decimal_text(value: i128, scale: i8) -> String {
    let digits = value.unsigned_abs().to_string();
    let sign = if value < 0 { "-" } else { "" };
    let Ok(scale) = usize::try_from(scale) else {
        return format!(
            "{sign}{digits}{}",
            "0".repeat(usize::from(scale.unsigned_abs()))
        );
    };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

/// `files` written for `target`, as the JSON a task result carries.
pub(crate) fn serialized(target: &TableTarget, files: Vec<DataFile>) -> Result<Vec<String>> {
    let partition_type = target.spec.partition_type(&target.schema)?;
    Ok(files
        .into_iter()
        .map(|f| serialize_data_file_to_json(f, &partition_type, target.format_version))
        .collect::<iceberg::Result<Vec<_>>>()?)
}

pub(crate) fn new_writer(
    target: &TableTarget,
    out: &TableOutput,
    file_prefix: String,
    layout: WriteLayout,
) -> Result<PartitionedWriter> {
    let props =
        super::parquet_settings::writer_properties(&out.parquet_properties).map_err(|message| {
            CoreError::Task {
                message,
                retryable: false,
            }
        })?;
    let row_groups = RowGroupLimits::of(&props);
    // Every builder shares one file counter (the generator's clones do), so no two files
    // of the task get one name.
    let file_io = crate::storage::iceberg_file_io(&out.data_location);
    let file_names = DefaultFileNameGenerator::new(file_prefix, None, DataFileFormat::Parquet);
    let builder_with = |props: WriterProperties| {
        let parquet = ParquetWriterBuilder::new_with_match_mode(
            props,
            target.schema.clone(),
            FieldMatchMode::Name,
        );
        DataFileWriterBuilder::new(RollingFileWriterBuilder::new(
            parquet,
            out.target_file_size_bytes.max(1 << 20) as usize,
            file_io.clone(),
            PartitionPathGenerator::new(out.data_location.clone()),
            file_names.clone(),
        ))
    };
    let by_partition = super::provenance::footers_by_partition(&out.parquet_properties)
        .into_iter()
        .map(|(partition, footer)| {
            let props = super::provenance::with_footer(props.clone(), footer);
            (partition, builder_with(props))
        })
        .collect();
    let builder = builder_with(props);
    Ok(if target.spec.is_unpartitioned() {
        PartitionedWriter::Unpartitioned(Box::new(UnpartitionedWriter::new(builder)))
    } else {
        let splitter = PartitionSplitter::try_new(target.schema.clone(), target.spec.clone())?;
        let sources = target
            .spec
            .fields()
            .iter()
            .filter_map(|f| target.schema.name_by_field_id(f.source_id))
            .map(str::to_string)
            .collect();
        let files = OpenFiles::new(
            (builder, by_partition),
            row_groups,
            layout.clustered,
            &layout.pool,
            "TableWriter".to_string(),
        );
        PartitionedWriter::Fanout(
            Box::new(files),
            Box::new(splitter),
            (!layout.clustered).then_some(sources),
        )
    })
}

/// What a final-stage task needs to write data files for `table`.
/// `checks` are the row checks the writing tasks count.
/// `evolved` is the schema the files are written with when the job changes the table's
/// (committed with its snapshot); otherwise the table's current one.
pub fn table_output(
    table: &iceberg::table::Table,
    evolved: Option<&iceberg::spec::Schema>,
    checks: Vec<nightshift_proto::v1::RowCheck>,
) -> Result<nightshift_proto::v1::TableOutput, CoreError> {
    let metadata = table.metadata();
    let json = |v: serde_json::Result<String>| {
        v.map_err(|e| CoreError::Protocol(format!("cannot serialize table metadata: {e}")))
    };
    let schema = evolved.unwrap_or(metadata.current_schema().as_ref());
    Ok(nightshift_proto::v1::TableOutput {
        data_location: format!("{}/data", metadata.location()),
        schema_json: json(serde_json::to_string(schema))?,
        partition_spec_json: json(serde_json::to_string(
            metadata.default_partition_spec().as_ref(),
        ))?,
        format_version: metadata.format_version() as u32,
        target_file_size_bytes: metadata
            .properties()
            .get("write.target-file-size-bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(512 << 20),
        checks,
        parquet_properties: parquet_settings_checked(table)?,
        rejects: None,
    })
}

/// The table's `write.parquet.*` properties for the workers' writers, refused here (before
/// any task runs) when the writer could not use them.
fn parquet_settings_checked(
    table: &iceberg::table::Table,
) -> Result<std::collections::HashMap<String, String>, CoreError> {
    use super::parquet_settings;
    let properties = parquet_settings::parquet_properties(table.metadata().properties());
    parquet_settings::writer_properties(&properties).map_err(|message| CoreError::Target {
        table: table.identifier().to_string(),
        message,
    })?;
    Ok(properties.into_iter().collect())
}

/// How a job's data files spread over the table's partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionFileCounts {
    /// Distinct partitions written (1 for an unpartitioned table with files).
    pub partitions: usize,
    /// Most data files any one partition received.
    pub max_files: usize,
}

/// Counts files per partition from data files serialized by the writer.
pub fn files_per_partition(data_files_json: &[String]) -> PartitionFileCounts {
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for json in data_files_json {
        let key = serde_json::from_str::<serde_json::Value>(json)
            .map(|v| v["partition"].to_string())
            .unwrap_or_default();
        *counts.entry(key).or_default() += 1;
    }
    PartitionFileCounts {
        partitions: counts.len(),
        max_files: counts.values().copied().max().unwrap_or(0),
    }
}

/// The paths of the data files in `data_files_json` (Iceberg data files as JSON).
pub fn data_file_paths(data_files_json: &[String]) -> Vec<String> {
    data_files_json
        .iter()
        .filter_map(|json| {
            let value: serde_json::Value = serde_json::from_str(json).ok()?;
            value.get("file_path")?.as_str().map(str::to_string)
        })
        .collect()
}

/// Reorders and casts a result batch to the table's Arrow schema, matching columns by name.
/// A value the table's type cannot hold (an unsigned 64-bit value past `i64::MAX` for a
/// `long`) fails the task naming the column and the value; Arrow's default cast would
/// write it as NULL.
pub fn conform_batch(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch> {
    let columns = target
        .fields()
        .iter()
        .map(|field| {
            let (index, _) = batch
                .schema()
                .column_with_name(field.name())
                .ok_or_else(|| CoreError::Task {
                    message: format!(
                        "result has no column `{}` required by the table",
                        field.name()
                    ),
                    retryable: false,
                })?;
            let column = batch.column(index);
            if column.data_type() == field.data_type() {
                Ok(column.clone())
            } else {
                let strict = CastOptions {
                    safe: false,
                    ..CastOptions::default()
                };
                cast_with_options(column, field.data_type(), &strict).map_err(|e| CoreError::Task {
                    message: format!(
                        "column `{}`: cannot convert {} to the table's {}: {e}",
                        field.name(),
                        column.data_type(),
                        field.data_type()
                    ),
                    retryable: false,
                })
            }
        })
        .collect::<Result<Vec<ArrayRef>>>()?;
    RecordBatch::try_new(target.clone(), columns).map_err(|e| CoreError::Task {
        message: format!("result does not fit the table schema: {e}"),
        retryable: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int32Array, StringArray, UInt64Array};

    #[test]
    fn a_decimal_past_its_precision_is_refused_naming_column_row_and_value() {
        use datafusion::arrow::array::Decimal128Array;
        let batch = |values: Vec<Option<i128>>| {
            let array = Decimal128Array::from(values)
                .with_precision_and_scale(5, 2)
                .unwrap();
            let field = Field::new("amount", DataType::Decimal128(5, 2), true);
            RecordBatch::try_new(
                Arc::new(ArrowSchema::new(vec![field])),
                vec![Arc::new(array)],
            )
            .unwrap()
        };
        assert!(
            refuse_decimals_past_their_precision(&batch(vec![Some(99_999), None, Some(-99_999)]))
                .is_ok()
        );
        let error = refuse_decimals_past_their_precision(&batch(vec![Some(1), Some(123_456)]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "column `amount` row 2: the value 1234.56 has more digits than decimal(5, 2)"
            ),
            "{error}"
        );
        assert_eq!(decimal_text(-5, 2), "-0.05");
        assert_eq!(decimal_text(i128::MAX, 0), i128::MAX.to_string());
        assert_eq!(decimal_text(12, -2), "1200");
    }

    #[test]
    fn a_nan_or_infinite_float_is_refused_as_an_identity_partition_value() {
        let batch = |values: ArrayRef| {
            let field = Field::new("f", values.data_type().clone(), true);
            RecordBatch::try_new(Arc::new(ArrowSchema::new(vec![field])), vec![values]).unwrap()
        };
        let finite: ArrayRef = Arc::new(arrow::array::Float64Array::from(vec![
            Some(1.5),
            None,
            Some(-0.0),
            Some(f64::MAX),
        ]));
        assert!(refuse_non_finite_partition_values(&batch(finite), "f").is_ok());
        for (values, shown) in [
            (
                Arc::new(arrow::array::Float64Array::from(vec![1.0, f64::NAN])) as ArrayRef,
                "NaN",
            ),
            (
                Arc::new(arrow::array::Float32Array::from(vec![f32::NEG_INFINITY])) as ArrayRef,
                "-inf",
            ),
        ] {
            let error = refuse_non_finite_partition_values(&batch(values), "f")
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("column `f`") && error.contains(&format!("the value {shown} ")),
                "{error}"
            );
        }
    }

    #[test]
    fn a_value_the_tables_type_cannot_hold_fails_by_column_and_value() {
        let schema = Arc::new(ArrowSchema::new(vec![Field::new(
            "h",
            DataType::UInt64,
            true,
        )]));
        let target = Arc::new(ArrowSchema::new(vec![Field::new(
            "h",
            DataType::Int64,
            true,
        )]));
        let fits = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(UInt64Array::from(vec![Some(5), None]))],
        )
        .unwrap();
        let conformed = conform_batch(&fits, &target).unwrap();
        assert_eq!(conformed.column(0).null_count(), 1);
        let too_large =
            RecordBatch::try_new(schema, vec![Arc::new(UInt64Array::from(vec![5, u64::MAX]))])
                .unwrap();
        let err = conform_batch(&too_large, &target).unwrap_err().to_string();
        assert!(
            err.contains("column `h`") && err.contains("18446744073709551615"),
            "{err}"
        );
    }
    use datafusion::arrow::datatypes::{DataType, Field, Schema as ArrowSchema};

    fn batch(days: Vec<i32>) -> RecordBatch {
        let n = days.len();
        let schema = Arc::new(ArrowSchema::new(vec![
            Field::new("day", DataType::Int32, true),
            Field::new("row", DataType::Utf8, true),
        ]));
        let rows: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int32Array::from(days)),
                Arc::new(StringArray::from(rows)),
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_batch_is_ordered_by_the_partition_sources_before_it_is_split() {
        // Above the slice size: ordered, every row kept with its own values.
        let days: Vec<i32> = (0..2_000).map(|i| (i * 7) % 5).collect();
        let ordered = ordered_by(&batch(days.clone()), &["day".to_string()]).unwrap();
        let got = ordered
            .column(0)
            .as_any()
            .downcast_ref::<Int32Array>()
            .unwrap();
        assert!(got.values().windows(2).all(|w| w[0] <= w[1]));
        let mut sorted = days.clone();
        sorted.sort();
        assert_eq!(got.values().to_vec(), sorted);
        let rows = ordered
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        for i in 0..ordered.num_rows() {
            let original: usize = rows.value(i)[1..].parse().unwrap();
            assert_eq!(days[original], got.value(i), "row {i} kept its day");
        }
        // Small batches and unknown columns are left as they are.
        let small = batch(vec![3, 1, 2]);
        assert_eq!(ordered_by(&small, &["day".to_string()]).unwrap(), small);
        let big = batch(days);
        assert_eq!(ordered_by(&big, &["nope".to_string()]).unwrap(), big);
    }

    /// A target partitioned by `fields` (transform, source) over `day` (a date), `region`,
    /// `name` and `id`, and a plan of those columns sorted by `sorted_by`.
    fn layout(
        fields: &[(iceberg::spec::Transform, &str)],
        sorted_by: &[&str],
    ) -> (Arc<dyn ExecutionPlan>, TableTarget) {
        use datafusion::physical_expr::expressions::Column;
        use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
        use datafusion::physical_plan::empty::EmptyExec;
        use datafusion::physical_plan::sorts::sort::SortExec;
        use iceberg::spec::{NestedField, PrimitiveType, Type};
        let columns = [
            ("day", PrimitiveType::Date),
            ("region", PrimitiveType::String),
            ("name", PrimitiveType::String),
            ("id", PrimitiveType::Long),
        ];
        let schema = Schema::builder()
            .with_fields(columns.iter().enumerate().map(|(i, (name, kind))| {
                NestedField::optional(i as i32 + 1, *name, Type::Primitive(kind.clone())).into()
            }))
            .build()
            .unwrap();
        let mut spec = PartitionSpec::builder(schema.clone());
        for (i, (transform, source)) in fields.iter().enumerate() {
            spec = spec
                .add_partition_field(*source, format!("field_{i}"), *transform)
                .unwrap();
        }
        let arrow_schema = Arc::new(schema_to_arrow_schema(&schema).unwrap());
        let mut plan: Arc<dyn ExecutionPlan> = Arc::new(EmptyExec::new(arrow_schema.clone()));
        let keys = sorted_by.iter().map(|name| {
            let index = arrow_schema.index_of(name).unwrap();
            PhysicalSortExpr::new_default(Arc::new(Column::new(name, index)))
        });
        if let Some(ordering) = LexOrdering::new(keys) {
            plan = Arc::new(SortExec::new(ordering, plan));
        }
        let target = TableTarget {
            spec: Arc::new(spec.build().unwrap()),
            schema: Arc::new(schema),
            format_version: FormatVersion::V2,
            arrow_schema,
        };
        (plan, target)
    }

    #[test]
    fn rows_are_clustered_when_sorted_by_every_field_in_turn_with_no_bucket_and_truncate_last() {
        use iceberg::spec::Transform::*;
        let clustered = |fields: &[(iceberg::spec::Transform, &str)], sorted_by: &[&str]| {
            let (plan, target) = layout(fields, sorted_by);
            clustered_by_partition(&plan, &target)
        };
        assert!(clustered(
            &[(Month, "day"), (Identity, "region")],
            &["day", "region"]
        ));
        assert!(clustered(&[(Day, "day")], &["day", "region"]));
        assert!(clustered(
            &[(Identity, "region"), (Truncate(2), "name")],
            &["region", "name"]
        ));
        // A field the sort leaves out, or sorts after another.
        assert!(!clustered(
            &[(Month, "day"), (Identity, "region")],
            &["day"]
        ));
        assert!(!clustered(
            &[(Month, "day"), (Identity, "region")],
            &["region", "day"]
        ));
        // A bucket anywhere, a truncate before another field, no sort, no partition.
        assert!(!clustered(&[(Bucket(8), "id")], &["id"]));
        assert!(!clustered(
            &[(Day, "day"), (Bucket(8), "id")],
            &["day", "id"]
        ));
        assert!(!clustered(
            &[(Truncate(2), "name"), (Identity, "region")],
            &["name", "region"]
        ));
        assert!(!clustered(&[(Day, "day")], &[]));
        assert!(!clustered(&[], &["day"]));
    }
}
