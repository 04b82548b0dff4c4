//! The reduce side: an execution plan node that reads shuffle segments from object storage.

use std::any::Any;
use std::fmt;
use std::io::Cursor;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{
    BaselineMetrics, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use url::Url;

use super::Segment;

/// Reads the output of upstream stage `stage_id`. Partition `i` reads `partitions[i]`; a
/// broadcast reader has one partition holding every segment of the upstream stage.
#[derive(Debug)]
pub struct ObjectStoreShuffleReaderExec {
    pub stage_id: u32,
    pub partitions: Vec<Vec<Segment>>,
    pub broadcast: bool,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    /// Rows produced and shuffle bytes fetched, per partition: what a task reports as read.
    metrics: ExecutionPlanMetricsSet,
}

impl ObjectStoreShuffleReaderExec {
    pub fn new(
        stage_id: u32,
        schema: SchemaRef,
        partitioning: Partitioning,
        partitions: Vec<Vec<Segment>>,
        broadcast: bool,
    ) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            partitioning,
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        ObjectStoreShuffleReaderExec {
            stage_id,
            partitions,
            broadcast,
            schema,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for ObjectStoreShuffleReaderExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let segments: usize = self.partitions.iter().map(Vec::len).sum();
        write!(
            f,
            "ObjectStoreShuffleReaderExec: stage={}, partitions={}, segments={segments}{}",
            self.stage_id,
            self.partitions.len(),
            if self.broadcast { ", broadcast" } else { "" }
        )
    }
}

impl ExecutionPlan for ObjectStoreShuffleReaderExec {
    fn name(&self) -> &str {
        "ObjectStoreShuffleReaderExec"
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
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "ObjectStoreShuffleReaderExec has no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let segments = self.partitions.get(partition).cloned().ok_or_else(|| {
            DataFusionError::Internal(format!(
                "shuffle reader of stage {} has no partition {partition}",
                self.stage_id
            ))
        })?;
        let schema = self.schema.clone();
        let batch_schema = schema.clone();
        let output = BaselineMetrics::new(&self.metrics, partition);
        let fetched = MetricBuilder::new(&self.metrics).counter("bytes_scanned", partition);
        let stream = futures::stream::iter(segments)
            .then(move |segment| {
                fetched.add(segment.length as usize);
                read_segment(context.clone(), segment, batch_schema.clone())
            })
            .map_ok(|batches| futures::stream::iter(batches.into_iter().map(Ok)))
            .try_flatten()
            .inspect_ok(move |batch| output.record_output(batch.num_rows()));
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// Fetches one segment with a ranged GET and decodes its Arrow IPC stream.
async fn read_segment(
    context: Arc<TaskContext>,
    segment: Segment,
    schema: SchemaRef,
) -> Result<Vec<RecordBatch>> {
    let url = Url::parse(&segment.path).map_err(|e| {
        DataFusionError::Internal(format!("bad shuffle path {}: {e}", segment.path))
    })?;
    let store_url = ObjectStoreUrl::parse(&url[..url::Position::BeforePath])?;
    let store = context.runtime_env().object_store(&store_url)?;
    let key = object_store::path::Path::from_url_path(url.path())
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
    let bytes = store
        .get_range(&key, segment.offset..segment.offset + segment.length)
        .await
        .map_err(|e| {
            DataFusionError::Context(
                format!("read shuffle segment {}", segment.path),
                Box::new(e.into()),
            )
        })?;
    let reader = StreamReader::try_new(Cursor::new(bytes), None)?;
    reader
        .map(|batch| {
            let batch = batch?;
            Ok(RecordBatch::try_new(
                schema.clone(),
                batch.columns().to_vec(),
            )?)
        })
        .collect()
}
