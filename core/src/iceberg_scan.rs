//! Reads the data files of an Iceberg source that have delete files (merge-on-read tables
//! written by Spark, Flink, Trino or DuckDB) through iceberg-rust's Arrow reader, which
//! applies their position and equality deletes.
//!
//! Files without deletes stay plain Parquet scans, where DataFusion prunes row groups and
//! knows statistics; only the files some delete applies to come here. [`DeletesApplied`] is
//! the table provider the planner sees; [`IcebergScanExec`] is its plan node. The node holds
//! iceberg-rust's own scan tasks (serde types), so [`crate::codec`] carries it to workers as
//! JSON and a worker reads its partition's tasks with the storage it already has.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::catalog::Session;
use datafusion::common::stats::Precision;
use datafusion::common::{Statistics, project_schema};
use datafusion::datasource::TableProvider;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use datafusion_proto::protobuf;
use futures::{StreamExt, TryStreamExt};
use iceberg::scan::FileScanTask;
use prost::Message;

/// The data files of one Iceberg table that delete files apply to, read with the deletes
/// applied.
#[derive(Debug, Clone)]
pub struct DeletesApplied {
    scan: TableScan,
    tasks: Vec<FileScanTask>,
}

/// The table a scan of such files reads, on the planner and on a worker.
#[derive(Debug, Clone)]
struct TableScan {
    /// The table's location: which storage the worker reads through.
    location: String,
    /// The table's columns (the current schema), as every other source of it is read.
    schema: SchemaRef,
    /// The Iceberg field id of each column of `schema`, in order.
    field_ids: Vec<i32>,
}

impl DeletesApplied {
    /// `tasks` are scan tasks of the table at `location` whose `schema` columns have the
    /// Iceberg `field_ids`. Fields the tasks cannot carry to a worker (partition constants,
    /// the name mapping) are dropped: the reader then reads those columns from the files.
    pub fn new(
        location: &str,
        schema: SchemaRef,
        field_ids: Vec<i32>,
        tasks: Vec<FileScanTask>,
    ) -> Self {
        let tasks = tasks.into_iter().map(portable).collect();
        DeletesApplied {
            scan: TableScan {
                location: location.to_string(),
                schema,
                field_ids,
            },
            tasks,
        }
    }

    /// How many data files this reads.
    pub fn files(&self) -> usize {
        self.tasks.len()
    }
}

/// A scan task without the fields iceberg-rust cannot serialize.
fn portable(mut task: FileScanTask) -> FileScanTask {
    task.partition = None;
    task.partition_spec = None;
    task.name_mapping = None;
    task.predicate = None;
    task
}

#[async_trait]
impl TableProvider for DeletesApplied {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.scan.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let projection = match projection {
            Some(columns) => columns.clone(),
            None => (0..self.scan.schema.fields().len()).collect(),
        };
        let groups = balanced_groups(&self.tasks, state.config().target_partitions().max(1));
        Ok(Arc::new(IcebergScanExec::new(
            self.scan.clone(),
            projection,
            groups,
        )?))
    }
}

/// Splits `tasks` into at most `partitions` groups of about equal bytes (largest file first,
/// each to the lightest group), keeping no empty group. The order within a group follows
/// `tasks`, so a plan is the same however often it is made.
pub fn balanced_groups(tasks: &[FileScanTask], partitions: usize) -> Vec<Vec<FileScanTask>> {
    let count = partitions.clamp(1, tasks.len().max(1));
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tasks[i].file_size_in_bytes));
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); count];
    let mut weights = vec![0u64; count];
    for i in order {
        let lightest = (0..count).min_by_key(|&g| (weights[g], g)).unwrap_or(0);
        weights[lightest] += tasks[i].file_size_in_bytes.max(1);
        members[lightest].push(i);
    }
    members
        .into_iter()
        .filter(|m| !m.is_empty())
        .map(|mut m| {
            m.sort_unstable();
            m.into_iter().map(|i| tasks[i].clone()).collect()
        })
        .collect()
}

/// Reads groups of Iceberg scan tasks, one group per partition, deletes applied.
#[derive(Debug)]
pub struct IcebergScanExec {
    scan: TableScan,
    /// The columns of the table's schema this outputs.
    projection: Vec<usize>,
    groups: Vec<Vec<FileScanTask>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl IcebergScanExec {
    fn new(
        scan: TableScan,
        projection: Vec<usize>,
        groups: Vec<Vec<FileScanTask>>,
    ) -> Result<Self> {
        let schema = project_schema(&scan.schema, Some(&projection))?;
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(groups.len().max(1)),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(IcebergScanExec {
            scan,
            projection,
            groups,
            schema,
            properties,
        })
    }

    /// The field ids the reader reads: the projected columns, or the first column when
    /// nothing is projected (a count still needs rows).
    fn read_field_ids(&self) -> Vec<i32> {
        let ids: Vec<i32> = self
            .projection
            .iter()
            .filter_map(|&c| self.scan.field_ids.get(c).copied())
            .collect();
        match (ids.is_empty(), self.scan.field_ids.first()) {
            (true, Some(&first)) => vec![first],
            _ => ids,
        }
    }
}

impl DisplayAs for IcebergScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let files: usize = self.groups.iter().map(Vec::len).sum();
        let deletes: std::collections::BTreeSet<&str> = self
            .groups
            .iter()
            .flatten()
            .flat_map(|t| t.deletes.iter().map(|d| d.file_path.as_str()))
            .collect();
        write!(
            f,
            "IcebergScanExec: {files} data file(s) with {} delete file(s) applied, partitions={}",
            deletes.len(),
            self.groups.len()
        )
    }
}

impl ExecutionPlan for IcebergScanExec {
    fn name(&self) -> &str {
        "IcebergScanExec"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.is_empty() {
            true => Ok(self),
            false => Err(DataFusionError::Internal(
                "IcebergScanExec has no children".into(),
            )),
        }
    }

    fn partition_statistics(&self, partition: Option<usize>) -> Result<Statistics> {
        let tasks: Vec<&FileScanTask> = match partition {
            Some(p) => self.groups.get(p).into_iter().flatten().collect(),
            None => self.groups.iter().flatten().collect(),
        };
        let mut statistics = Statistics::new_unknown(&self.schema);
        // Before deletes: an upper bound, so inexact.
        if let Some(rows) = tasks.iter().map(|t| t.record_count).sum::<Option<u64>>() {
            statistics.num_rows = Precision::Inexact(rows as usize);
        }
        let bytes: u64 = tasks.iter().map(|t| t.file_size_in_bytes).sum();
        statistics.total_byte_size = Precision::Inexact(bytes as usize);
        Ok(statistics)
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let field_ids = self.read_field_ids();
        let tasks: Vec<FileScanTask> = self
            .groups
            .get(partition)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|mut t| {
                t.project_field_ids = field_ids.clone();
                t
            })
            .collect();
        let runtime = iceberg::Runtime::try_current().map_err(iceberg_error)?;
        let reader = iceberg::arrow::ArrowReaderBuilder::new(
            crate::storage::iceberg_file_io(&self.scan.location),
            runtime,
        )
        .with_batch_size(context.session_config().batch_size())
        .with_data_file_concurrency_limit(1)
        .build();
        let schema = self.schema.clone();
        let batch_schema = schema.clone();
        let batches = futures::stream::once(async move {
            let tasks: iceberg::scan::FileScanTaskStream =
                Box::pin(futures::stream::iter(tasks.into_iter().map(Ok)));
            let read = reader.read(tasks).map_err(iceberg_error)?;
            Ok::<_, DataFusionError>(
                read.stream()
                    .map(move |batch| conform(batch.map_err(iceberg_error)?, &batch_schema)),
            )
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
    }
}

/// The reader's batch as a batch of `schema`: its columns picked by name (and cast where
/// the reader's type differs), or only its row count when `schema` has no column.
fn conform(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| {
            let column = batch.column_by_name(field.name()).ok_or_else(|| {
                DataFusionError::Execution(format!(
                    "the Iceberg reader returned no column `{}`",
                    field.name()
                ))
            })?;
            match column.data_type() == field.data_type() {
                true => Ok(column.clone()),
                false => Ok(cast(column, field.data_type())?),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &options,
    )?)
}

fn iceberg_error(e: iceberg::Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// [`IcebergScanExec`] as its codec sends it.
#[derive(serde::Serialize, serde::Deserialize)]
struct ScanNode {
    location: String,
    /// The table's schema as DataFusion's protobuf `Schema`.
    schema: Vec<u8>,
    field_ids: Vec<i32>,
    projection: Vec<usize>,
    groups: Vec<Vec<FileScanTask>>,
}

/// Serializes `node` for a task message.
pub fn encode(node: &IcebergScanExec, buf: &mut Vec<u8>) -> Result<()> {
    let schema = protobuf::Schema::try_from(node.scan.schema.as_ref())?;
    let message = ScanNode {
        location: node.scan.location.clone(),
        schema: schema.encode_to_vec(),
        field_ids: node.scan.field_ids.clone(),
        projection: node.projection.clone(),
        groups: node.groups.clone(),
    };
    serde_json::to_writer(buf, &message)
        .map_err(|e| DataFusionError::Internal(format!("encode Iceberg scan: {e}")))
}

/// Deserializes what [`encode`] wrote.
pub fn decode(body: &[u8]) -> Result<Arc<dyn ExecutionPlan>> {
    let node: ScanNode = serde_json::from_slice(body)
        .map_err(|e| DataFusionError::Internal(format!("decode Iceberg scan: {e}")))?;
    let schema = protobuf::Schema::decode(node.schema.as_slice())
        .map_err(|e| DataFusionError::Internal(format!("decode Iceberg scan schema: {e}")))?;
    let schema: Schema = (&schema).try_into()?;
    let scan = TableScan {
        location: node.location,
        schema: Arc::new(schema),
        field_ids: node.field_ids,
    };
    Ok(Arc::new(IcebergScanExec::new(
        scan,
        node.projection,
        node.groups,
    )?))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::physical_plan::collect;
    use datafusion::prelude::SessionContext;
    use iceberg::scan::FileScanTaskDeleteFile;
    use iceberg::spec::{DataContentType, DataFileFormat, NestedField, PrimitiveType, Type};

    use super::*;

    fn id_field(name: &str, data_type: DataType, id: i32) -> Field {
        Field::new(name, data_type, true).with_metadata(HashMap::from([(
            "PARQUET:field_id".to_string(),
            id.to_string(),
        )]))
    }

    /// Writes `batch` as a Parquet file at `path`; returns its size.
    pub(crate) fn write_parquet(path: &std::path::Path, batch: RecordBatch) -> u64 {
        let file = std::fs::File::create(path).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        std::fs::metadata(path).unwrap().len()
    }

    fn iceberg_schema() -> iceberg::spec::SchemaRef {
        Arc::new(
            iceberg::spec::Schema::builder()
                .with_fields(vec![
                    NestedField::optional(1, "id", Type::Primitive(PrimitiveType::Long)).into(),
                    NestedField::optional(2, "name", Type::Primitive(PrimitiveType::String)).into(),
                ])
                .build()
                .unwrap(),
        )
    }

    /// A data file of ids `ids` (names `n<id>`, one unicode) and its scan task.
    fn data_file(dir: &std::path::Path, file: &str, ids: std::ops::Range<i64>) -> FileScanTask {
        let schema = Arc::new(Schema::new(vec![
            id_field("id", DataType::Int64, 1),
            id_field("name", DataType::Utf8, 2),
        ]));
        let names: Vec<String> = ids.clone().map(|i| format!("n{i}é")).collect();
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(ids.clone())),
                Arc::new(StringArray::from(names)),
            ],
        )
        .unwrap();
        let path = dir.join(file);
        let size = write_parquet(&path, batch);
        scan_task(path.display().to_string(), size, Some(ids.count() as u64))
    }

    /// The scan task of the whole data file at `path`.
    fn scan_task(path: String, size: u64, record_count: Option<u64>) -> FileScanTask {
        FileScanTask {
            file_size_in_bytes: size,
            start: 0,
            length: size,
            record_count,
            data_file_path: path,
            data_file_format: DataFileFormat::Parquet,
            schema: iceberg_schema(),
            project_field_ids: vec![1, 2],
            predicate: None,
            deletes: Vec::new(),
            partition: None,
            partition_spec: None,
            name_mapping: None,
            case_sensitive: true,
        }
    }

    /// A position delete file removing rows `positions` of `data`.
    fn position_deletes(
        dir: &std::path::Path,
        file: &str,
        data: &FileScanTask,
        positions: &[i64],
    ) -> FileScanTaskDeleteFile {
        let schema = Arc::new(Schema::new(vec![
            id_field("file_path", DataType::Utf8, 2147483546),
            id_field("pos", DataType::Int64, 2147483545),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![
                    data.data_file_path.clone();
                    positions.len()
                ])),
                Arc::new(Int64Array::from(positions.to_vec())),
            ],
        )
        .unwrap();
        delete_file(
            dir.join(file),
            batch,
            DataContentType::PositionDeletes,
            None,
        )
    }

    /// Writes `batch` as a delete file of `kind` at `path`.
    fn delete_file(
        path: std::path::PathBuf,
        batch: RecordBatch,
        kind: DataContentType,
        equality_ids: Option<Vec<i32>>,
    ) -> FileScanTaskDeleteFile {
        let size = write_parquet(&path, batch);
        FileScanTaskDeleteFile {
            file_path: path.display().to_string(),
            file_size_in_bytes: size,
            file_type: kind,
            partition_spec_id: 0,
            equality_ids,
        }
    }

    /// An equality delete file removing the rows whose id is one of `ids`.
    fn equality_deletes(dir: &std::path::Path, file: &str, ids: &[i64]) -> FileScanTaskDeleteFile {
        let schema = Arc::new(Schema::new(vec![id_field("id", DataType::Int64, 1)]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(ids.to_vec()))]).unwrap();
        delete_file(
            dir.join(file),
            batch,
            DataContentType::EqualityDeletes,
            Some(vec![1]),
        )
    }

    fn table(dir: &std::path::Path, tasks: Vec<FileScanTask>) -> DeletesApplied {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
        ]));
        DeletesApplied::new(&dir.display().to_string(), schema, vec![1, 2], tasks)
    }

    /// Two data files: positions 0 and 2 of the first deleted by position, ids 12 and 13 of
    /// the second by equality.
    fn with_both_kinds(dir: &std::path::Path) -> DeletesApplied {
        let mut first = data_file(dir, "a.parquet", 0..5);
        first.deletes = vec![position_deletes(dir, "a-deletes.parquet", &first, &[0, 2])];
        let mut second = data_file(dir, "b.parquet", 10..15);
        second.deletes = vec![equality_deletes(dir, "b-eq-deletes.parquet", &[12, 13, 99])];
        table(dir, vec![first, second])
    }

    async fn ids_of(ctx: &SessionContext, plan: Arc<dyn ExecutionPlan>) -> Vec<i64> {
        let batches = collect(plan, ctx.task_ctx()).await.unwrap();
        let mut ids: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                let column = b.column_by_name("id").unwrap();
                let ids = column.as_any().downcast_ref::<Int64Array>().unwrap();
                ids.values().to_vec()
            })
            .collect();
        ids.sort_unstable();
        ids
    }

    #[tokio::test]
    async fn position_and_equality_deletes_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(with_both_kinds(dir.path())))
            .unwrap();
        let frame = ctx.sql("SELECT id, name FROM t ORDER BY id").await.unwrap();
        let text = pretty_format_batches(&frame.collect().await.unwrap())
            .unwrap()
            .to_string();
        for kept in ["n1é", "n3é", "n4é", "n10é", "n11é", "n14é"] {
            assert!(text.contains(kept), "{kept} missing:\n{text}");
        }
        for deleted in ["n0é", "n2é", "n12é", "n13é"] {
            assert!(!text.contains(deleted), "{deleted} not deleted:\n{text}");
        }
        let counted = ctx.sql("SELECT COUNT(*) AS n FROM t").await.unwrap();
        let text = pretty_format_batches(&counted.collect().await.unwrap())
            .unwrap()
            .to_string();
        assert!(text.contains("| 6 |"), "{text}");
    }

    #[tokio::test]
    async fn the_plan_crosses_the_codec_and_reads_the_same_rows() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = SessionContext::new_with_config(
            datafusion::prelude::SessionConfig::new().with_target_partitions(2),
        );
        let provider = with_both_kinds(dir.path());
        let plan = provider
            .scan(&ctx.state(), Some(&vec![1, 0]), &[], None)
            .await
            .unwrap();
        assert_eq!(plan.properties().output_partitioning().partition_count(), 2);
        let bytes = crate::codec::encode_plan(plan.clone()).unwrap();
        let decoded = crate::codec::decode_plan(&bytes, &ctx.task_ctx()).unwrap();
        assert_eq!(decoded.schema(), plan.schema());
        assert_eq!(decoded.schema().field(0).name(), "name");
        assert_eq!(ids_of(&ctx, decoded).await, vec![1, 3, 4, 10, 11, 14]);
        assert_eq!(ids_of(&ctx, plan).await, vec![1, 3, 4, 10, 11, 14]);
    }

    fn sized(size: u64) -> FileScanTask {
        scan_task(format!("s3://b/t/data/{size}.parquet"), size, None)
    }

    #[test]
    fn groups_balance_bytes_and_keep_no_empty_group() {
        let tasks: Vec<FileScanTask> = [100, 10, 60, 50].into_iter().map(sized).collect();
        let groups = balanced_groups(&tasks, 2);
        let weights: Vec<u64> = groups
            .iter()
            .map(|g| g.iter().map(|t| t.file_size_in_bytes).sum())
            .collect();
        assert_eq!(weights, vec![110, 110]);
        // Within a group, the tasks' own order.
        assert_eq!(groups[0][0].file_size_in_bytes, 100);
        assert_eq!(groups[0][1].file_size_in_bytes, 10);
        assert_eq!(balanced_groups(&tasks[..1], 8).len(), 1);
        assert_eq!(balanced_groups(&[], 4).len(), 0);
        let all: usize = balanced_groups(&tasks, 3).iter().map(Vec::len).sum();
        assert_eq!(all, 4);
    }

    #[test]
    fn tasks_lose_only_what_cannot_travel() {
        let mut task = sized(7);
        task.partition = Some(iceberg::spec::Struct::empty());
        let kept = portable(task.clone());
        assert!(kept.partition.is_none());
        assert_eq!(kept.data_file_path, task.data_file_path);
        assert!(serde_json::to_string(&kept).is_ok());
    }
}
