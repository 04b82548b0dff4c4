//! Serializes stage plans for task messages: Ballista's physical codec plus Nightshift's
//! object-store shuffle reader, the source contract's not-null check, the Iceberg scan of
//! files with deletes and the embedded mode's shared plan (sent by key).

use std::sync::Arc;

use ballista_core::serde::BallistaPhysicalExtensionCodec;
use bytes::Bytes;
use datafusion::arrow::datatypes::Schema;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::bytes::{
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use datafusion_proto::physical_plan::from_proto::parse_protobuf_partitioning;
use datafusion_proto::physical_plan::to_proto::serialize_partitioning;
use datafusion_proto::physical_plan::{
    DefaultPhysicalExtensionCodec, DefaultPhysicalProtoConverter, PhysicalExtensionCodec,
};
use datafusion_proto::protobuf;
use nightshift_proto::v1;
use prost::Message;

use crate::iceberg_scan::IcebergScanExec;
use crate::not_null::{NotNullCheck, NotNullCheckExec};
use crate::shared_plan::SharedPlanExec;
use crate::shuffle::{ObjectStoreShuffleReaderExec, Segment};

/// Marks an extension node as Nightshift's rather than Ballista's.
const MAGIC: &[u8] = b"NSX1";
/// Marks a [`SharedPlanExec`]: the key of a plan registered in this process.
const SHARED_MAGIC: &[u8] = b"NSP1";
/// Marks a [`NotNullCheckExec`]: its checks as JSON; its input is the node's one input.
const NOT_NULL_MAGIC: &[u8] = b"NSN1";
/// Marks an [`IcebergScanExec`]: its scan tasks as JSON.
const ICEBERG_SCAN_MAGIC: &[u8] = b"NSI1";

/// The physical extension codec for stage plans.
#[derive(Debug, Default)]
pub struct NightshiftCodec {
    ballista: BallistaPhysicalExtensionCodec,
}

/// Serializes a stage plan.
pub fn encode_plan(plan: Arc<dyn ExecutionPlan>) -> Result<Bytes> {
    physical_plan_to_bytes_with_extension_codec(plan, &NightshiftCodec::default())
}

/// Deserializes a stage plan in the worker's task context.
pub fn decode_plan(bytes: &[u8], ctx: &TaskContext) -> Result<Arc<dyn ExecutionPlan>> {
    physical_plan_from_bytes_with_extension_codec(bytes, ctx, &NightshiftCodec::default())
}

impl PhysicalExtensionCodec for NightshiftCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if let Some(key) = buf.strip_prefix(SHARED_MAGIC) {
            let key = std::str::from_utf8(key)
                .map_err(|e| DataFusionError::Internal(format!("shared plan key: {e}")))?;
            return Ok(SharedPlanExec::lookup(key)?);
        }
        if let Some(json) = buf.strip_prefix(NOT_NULL_MAGIC) {
            let checks: Vec<NotNullCheck> = serde_json::from_slice(json)
                .map_err(|e| DataFusionError::Internal(format!("not-null checks: {e}")))?;
            let [input] = inputs else {
                return Err(DataFusionError::Internal(
                    "a not-null check has one input".into(),
                ));
            };
            return Ok(Arc::new(NotNullCheckExec::new(input.clone(), checks)));
        }
        if let Some(json) = buf.strip_prefix(ICEBERG_SCAN_MAGIC) {
            return crate::iceberg_scan::decode(json);
        }
        match buf.strip_prefix(MAGIC) {
            Some(body) => decode_reader(body, ctx),
            None => self.ballista.try_decode(buf, inputs, ctx),
        }
    }

    fn try_encode(&self, node: Arc<dyn ExecutionPlan>, buf: &mut Vec<u8>) -> Result<()> {
        if let Some(shared) = node.as_any().downcast_ref::<SharedPlanExec>() {
            buf.extend_from_slice(SHARED_MAGIC);
            buf.extend_from_slice(shared.key().as_bytes());
            return Ok(());
        }
        if let Some(check) = node.as_any().downcast_ref::<NotNullCheckExec>() {
            buf.extend_from_slice(NOT_NULL_MAGIC);
            let json = serde_json::to_vec(check.checks())
                .map_err(|e| DataFusionError::Internal(format!("not-null checks: {e}")))?;
            buf.extend_from_slice(&json);
            return Ok(());
        }
        if let Some(scan) = node.as_any().downcast_ref::<IcebergScanExec>() {
            buf.extend_from_slice(ICEBERG_SCAN_MAGIC);
            return crate::iceberg_scan::encode(scan, buf);
        }
        match node.as_any().downcast_ref::<ObjectStoreShuffleReaderExec>() {
            Some(reader) => {
                buf.extend_from_slice(MAGIC);
                encode_reader(reader, buf)
            }
            None => self.ballista.try_encode(node, buf),
        }
    }
}

fn encode_reader(reader: &ObjectStoreShuffleReaderExec, buf: &mut Vec<u8>) -> Result<()> {
    let schema = protobuf::Schema::try_from(reader.schema().as_ref())?;
    let partitioning = serialize_partitioning(
        reader.properties().output_partitioning(),
        &DefaultPhysicalExtensionCodec {},
        &DefaultPhysicalProtoConverter {},
    )?;
    let node = v1::ShuffleReadNode {
        stage_id: reader.stage_id,
        schema: schema.encode_to_vec(),
        partitioning: partitioning.encode_to_vec(),
        broadcast: reader.broadcast,
        partitions: reader
            .partitions
            .iter()
            .map(|segments| v1::SegmentList {
                segments: segments.iter().map(Into::into).collect(),
            })
            .collect(),
    };
    node.encode(buf)
        .map_err(|e| DataFusionError::Internal(format!("encode shuffle reader: {e}")))
}

fn decode_reader(body: &[u8], ctx: &TaskContext) -> Result<Arc<dyn ExecutionPlan>> {
    let proto_err = |what: &str, e: prost::DecodeError| {
        DataFusionError::Internal(format!("decode shuffle reader {what}: {e}"))
    };
    let node = v1::ShuffleReadNode::decode(body).map_err(|e| proto_err("node", e))?;
    let schema =
        protobuf::Schema::decode(node.schema.as_slice()).map_err(|e| proto_err("schema", e))?;
    let schema: Schema = (&schema).try_into()?;
    let partitioning = protobuf::Partitioning::decode(node.partitioning.as_slice())
        .map_err(|e| proto_err("partitioning", e))?;
    let partitioning = parse_protobuf_partitioning(
        Some(&partitioning),
        ctx,
        &schema,
        &DefaultPhysicalExtensionCodec {},
        &DefaultPhysicalProtoConverter {},
    )?
    .ok_or_else(|| DataFusionError::Internal("shuffle reader without partitioning".into()))?;
    let partitions = node
        .partitions
        .iter()
        .map(|list| list.segments.iter().map(Segment::from).collect())
        .collect();
    Ok(Arc::new(ObjectStoreShuffleReaderExec::new(
        node.stage_id,
        Arc::new(schema),
        partitioning,
        partitions,
        node.broadcast,
    )))
}
