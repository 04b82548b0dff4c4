//! Serializes stage plans for task messages: Ballista's physical codec plus Nightshift's
//! object-store shuffle reader, the source contract's not-null check, the Iceberg scan of
//! files with deletes, the window's per-partition top K and the embedded mode's shared plan
//! (sent by key).

use std::sync::Arc;

use ballista_core::serde::BallistaPhysicalExtensionCodec;
use bytes::Bytes;
use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::datatypes::Schema;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::PhysicalSortExpr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::bytes::{
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use datafusion_proto::physical_plan::from_proto::{
    parse_physical_sort_exprs, parse_protobuf_partitioning,
};
use datafusion_proto::physical_plan::to_proto::{
    serialize_partitioning, serialize_physical_sort_exprs,
};
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
use crate::window_topk::{PartitionTopKExec, TopKMode};

/// Marks an extension node as Nightshift's rather than Ballista's.
const MAGIC: &[u8] = b"NSX1";
/// Marks a [`SharedPlanExec`]: the key of a plan registered in this process.
const SHARED_MAGIC: &[u8] = b"NSP1";
/// Marks a [`NotNullCheckExec`]: its checks as JSON; its input is the node's one input.
const NOT_NULL_MAGIC: &[u8] = b"NSN1";
/// Marks an [`IcebergScanExec`]: its scan tasks as JSON.
const ICEBERG_SCAN_MAGIC: &[u8] = b"NSI1";
/// Marks a [`PartitionTopKExec`]: K, the number of partition keys and its mode (0 at least
/// K rows, 1 exact, 2 before a shuffle; u32 little-endian each), then the partition keys (as ascending sort expressions) and the order as one
/// protobuf sort-expression list; its input is the node's one input.
const TOP_K_MAGIC: &[u8] = b"NSK1";

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
        if let Some(body) = buf.strip_prefix(TOP_K_MAGIC) {
            return decode_top_k(body, inputs, ctx);
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
        if let Some(top_k) = node.as_any().downcast_ref::<PartitionTopKExec>() {
            buf.extend_from_slice(TOP_K_MAGIC);
            return encode_top_k(top_k, buf);
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

fn encode_top_k(node: &PartitionTopKExec, buf: &mut Vec<u8>) -> Result<()> {
    let keys = node.partition_by().iter().map(|expr| PhysicalSortExpr {
        expr: expr.clone(),
        options: SortOptions::default(),
    });
    let exprs = serialize_physical_sort_exprs(
        keys.chain(node.order_by().iter().cloned()),
        &NightshiftCodec::default(),
        &DefaultPhysicalProtoConverter {},
    )?;
    let count = |n: usize| {
        u32::try_from(n).map_err(|_| DataFusionError::Internal(format!("top k: {n} too large")))
    };
    buf.extend_from_slice(&count(node.k())?.to_le_bytes());
    buf.extend_from_slice(&count(node.partition_by().len())?.to_le_bytes());
    let mode: u32 = match node.mode() {
        TopKMode::AtLeast => 0,
        TopKMode::Exact => 1,
        TopKMode::BeforeShuffle => 2,
    };
    buf.extend_from_slice(&mode.to_le_bytes());
    protobuf::PhysicalSortExprNodeCollection {
        physical_sort_expr_nodes: exprs,
    }
    .encode(buf)
    .map_err(|e| DataFusionError::Internal(format!("encode top k: {e}")))
}

fn decode_top_k(
    body: &[u8],
    inputs: &[Arc<dyn ExecutionPlan>],
    ctx: &TaskContext,
) -> Result<Arc<dyn ExecutionPlan>> {
    let malformed = |what: &str| DataFusionError::Internal(format!("decode top k: {what}"));
    let [input] = inputs else {
        return Err(malformed("a top k has one input"));
    };
    let word = |at: usize| -> Result<usize> {
        let bytes = body.get(at..at + 4).ok_or_else(|| malformed("short"))?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")) as usize)
    };
    let (k, keys) = (word(0)?, word(4)?);
    let mode = match word(8)? {
        0 => TopKMode::AtLeast,
        1 => TopKMode::Exact,
        2 => TopKMode::BeforeShuffle,
        other => return Err(malformed(&format!("mode {other}"))),
    };
    let list = protobuf::PhysicalSortExprNodeCollection::decode(&body[12..])
        .map_err(|e| malformed(&e.to_string()))?;
    let mut exprs = parse_physical_sort_exprs(
        &list.physical_sort_expr_nodes,
        ctx,
        &input.schema(),
        &NightshiftCodec::default(),
        &DefaultPhysicalProtoConverter {},
    )?;
    if keys > exprs.len() {
        return Err(malformed("more keys than expressions"));
    }
    let order = exprs.split_off(keys);
    let keys = exprs.into_iter().map(|e| e.expr).collect();
    Ok(Arc::new(PartitionTopKExec::new(
        input.clone(),
        keys,
        order,
        k,
        mode,
    )))
}
