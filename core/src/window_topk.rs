//! The first rows of each window partition, kept before the window's sort.
//!
//! The nightly dedupe `ROW_NUMBER() OVER (PARTITION BY key ORDER BY ...) AS rn ... WHERE rn = 1`
//! (or `rn <= K`) plans as a filter over a window over a sort of every input row: at TPC-H SF1
//! the latest order per customer sorts 1.5 M orders to keep 100 k, and the sort's merge was
//! most of the run. DataFusion 53 has no per-partition top K (upstream added one later), so
//! [`WindowTopK`] puts a [`PartitionTopKExec`] below the sort: it passes on only the first K
//! rows of each window partition in the window's order, and the sort, the window and the
//! filter above it compute the same rows from far fewer. For K = 1 the sort and the window
//! go: every row passed on is the first of its key, numbered 1 by a projection. When the
//! sort's input is a hash repartition between stages (a shuffle through object storage on a
//! cluster), a second top K goes below it, so the shuffle carries each task's first K rows
//! per key rather than every row; in one process the exchange is in memory, and that second
//! pass would cost more than it saves. That second pass gives up when its first rows show
//! it keeping most of them (each task's slice of the input has nearly every key once), and
//! passes the rest on as they come ([`TopKMode::BeforeShuffle`]).
//!
//! Correctness: the rows passed on are a subset of the input holding, for each partition key,
//! K rows of the smallest order keys (with ties, any K of them: `ROW_NUMBER` numbers tied
//! rows in any order). The window numbers those rows 1..K as it would have numbered them over
//! the whole input, and the filter keeps `rn <= K`. The rule applies only when the window
//! computes `row_number()` alone (any other window function, such as a running sum, sees the
//! whole partition) and the filter bounds that column by a constant.
//!
//! Memory: the node holds at most K rows per key (plus rows it has replaced, dropped when they
//! outnumber the kept ones). Should its memory pool refuse that, it gives its reservation back
//! and passes what it holds and then every remaining row on. With a sort above it (K > 1), that
//! sort, which spills, sees the rows it would have seen without this node. In the K = 1 plan
//! nothing above would drop a second row of a key, so there the node is `exact`: it sorts
//! those rows itself by key and order with DataFusion's spilling sort and passes on the first
//! K of each key ([`by_sort`]): the plan's cost before this node existed, not a failed task.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, Int64Array, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{interleave_record_batch, take_record_batch};
use datafusion::arrow::datatypes::{DataType, Int64Type, SchemaRef};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::ScalarValue;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, Column, Literal, TryCastExpr};
use datafusion::physical_expr::window::StandardWindowExpr;
use datafusion::physical_expr::{
    EquivalenceProperties, PhysicalExpr, PhysicalSortExpr, split_conjunction,
};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowAggExec, WindowUDFExpr};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties, WindowExpr,
};
use futures::{StreamExt, TryStreamExt};
use hashbrown::{DefaultHashBuilder, HashTable};
use smallvec::SmallVec;

use crate::session::NightshiftOptions;
use std::hash::BuildHasher;

mod by_sort;

/// The largest K the rule applies to: each key's rows are kept in a list scanned per row.
pub const MAX_TOP_K: usize = 1000;

/// Rows a [`TopKMode::BeforeShuffle`] node reads before it judges whether it pays.
const PROBE_ROWS: usize = 100_000;

/// What a [`PartitionTopKExec`] passes on, and what it does when holding rows does not pay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopKMode {
    /// Exactly the first K rows of each key: nothing above it drops a row. Past its memory it
    /// sorts, with spill ([`by_sort`]).
    Exact,
    /// At least the first K rows of each key: a sort and the window's filter above drop the
    /// rest. Past its memory it passes every row on.
    AtLeast,
    /// As `AtLeast`, below a shuffle, with an exact node above the shuffle: and when its
    /// first [`PROBE_ROWS`] rows show it keeping most of what it reads ([`holding_pays`]), it
    /// passes what it holds and every later row on as they come. Each task of a cluster
    /// reads a slice of the input, and the exact node after the shuffle looks every row it
    /// gets up again: holding rows here pays only when it spares the shuffle most of them.
    /// The latest order per customer at SF10 (11 tasks of 1.36 M orders) kept 94 % of a
    /// task's first 100 k rows and about half of the whole task; passing them on halved
    /// the workers' CPU (load-tests/README.md).
    BeforeShuffle,
}

/// Whether a [`TopKMode::BeforeShuffle`] node that kept `kept` of the first `read` rows
/// should go on holding rows: it should when it drops at least a fifth of them, the ratio
/// DataFusion's partial aggregate judges itself by
/// (`skip_partial_aggregation_probe_ratio_threshold`, 0.8).
pub fn holding_pays(read: usize, kept: usize) -> bool {
    kept as u128 * 5 <= read as u128 * 4
}

/// Passes on the first `k` rows of each `partition_by` key in `order_by` order (a subset of
/// its input, in no particular order); see the module documentation. Unless its `mode` is
/// [`TopKMode::Exact`], it may pass on more rows than that.
#[derive(Debug)]
pub struct PartitionTopKExec {
    input: Arc<dyn ExecutionPlan>,
    partition_by: Vec<Arc<dyn PhysicalExpr>>,
    order_by: Vec<PhysicalSortExpr>,
    k: usize,
    mode: TopKMode,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl PartitionTopKExec {
    pub fn new(
        input: Arc<dyn ExecutionPlan>,
        partition_by: Vec<Arc<dyn PhysicalExpr>>,
        order_by: Vec<PhysicalSortExpr>,
        k: usize,
        mode: TopKMode,
    ) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(input.schema()),
            input.properties().output_partitioning().clone(),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        PartitionTopKExec {
            input,
            partition_by,
            order_by,
            k,
            mode,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    pub fn partition_by(&self) -> &[Arc<dyn PhysicalExpr>] {
        &self.partition_by
    }

    pub fn order_by(&self) -> &[PhysicalSortExpr] {
        &self.order_by
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn mode(&self) -> TopKMode {
        self.mode
    }
}

impl DisplayAs for PartitionTopKExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let keys: Vec<String> = self.partition_by.iter().map(|e| e.to_string()).collect();
        let order: Vec<String> = self.order_by.iter().map(|e| e.to_string()).collect();
        write!(
            f,
            "PartitionTopKExec: k={}{}, partition_by=[{}], order_by=[{}]",
            self.k,
            match self.mode {
                TopKMode::Exact => " (exact)",
                TopKMode::AtLeast => "",
                TopKMode::BeforeShuffle => " (before shuffle)",
            },
            keys.join(", "),
            order.join(", ")
        )
    }
}

impl ExecutionPlan for PartitionTopKExec {
    fn name(&self) -> &str {
        "PartitionTopKExec"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.as_slice() {
            [child] => Ok(Arc::new(PartitionTopKExec::new(
                child.clone(),
                self.partition_by.clone(),
                self.order_by.clone(),
                self.k,
                self.mode,
            ))),
            _ => Err(DataFusionError::Internal(
                "PartitionTopKExec has one child".into(),
            )),
        }
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let mut input = self.input.execute(partition, context.clone())?;
        let schema = self.input.schema();
        let output_schema = schema.clone();
        // Spillable: on a refusal it gives its memory back (see the module documentation),
        // so the pool holds it to its fair share, and one task's top K does not take the
        // memory another task's sort needs to spill.
        let reservation = MemoryConsumer::new(format!("PartitionTopKExec[{partition}]"))
            .with_can_spill(true)
            .register(context.memory_pool());
        let mut top = TopRows::new(
            &schema,
            self.partition_by.clone(),
            self.order_by.clone(),
            self.k,
            reservation,
        )?;
        let batch_size = context.session_config().batch_size();
        let metrics = BaselineMetrics::new(&self.metrics, partition);
        let rows_out = metrics.output_rows().clone();
        let sorted_instead = (self.mode == TopKMode::Exact).then(|| {
            let (keys, order, k) = (self.partition_by.clone(), self.order_by.clone(), self.k);
            move |rows| by_sort::first_k_by_sort(rows, &keys, &order, k, context)
        });
        let mut probing = self.mode == TopKMode::BeforeShuffle;
        let output = futures::stream::once(async move {
            type Batches = futures::stream::BoxStream<'static, Result<RecordBatch>>;
            while let Some(batch) = input.next().await {
                let batch = batch?;
                let _timer = metrics.elapsed_compute().timer();
                let refused = top.push(&batch)?;
                if probing && refused.is_none() && top.rows_read >= PROBE_ROWS {
                    probing = false;
                    if !holding_pays(top.rows_read, top.live_rows) {
                        // The shuffle carries the rest; the exact node above it drops them.
                        tracing::debug!(
                            read = top.rows_read,
                            kept = top.live_rows,
                            "a top K before a shuffle keeps most rows: passing them on"
                        );
                        let held =
                            futures::stream::iter(top.finish(batch_size)?.into_iter().map(Ok));
                        return Ok::<Batches, DataFusionError>(held.chain(input).boxed());
                    }
                }
                if let Some(refusal) = refused {
                    // The pool refused to hold more: what is held (its reservation given
                    // back), then the rest.
                    let keys = top.keys_held();
                    let held = futures::stream::iter(top.into_held().into_iter().map(Ok));
                    let rows = held.chain(input);
                    let Some(sort) = sorted_instead else {
                        // A sort above drops what is not among the first K.
                        return Ok::<Batches, DataFusionError>(rows.boxed());
                    };
                    // Nothing above does: sort here, spilling as the sort above did
                    // before this node was put in.
                    tracing::info!(
                        keys,
                        %refusal,
                        "a first-row-per-key dedupe outgrew its memory; sorting, with spill"
                    );
                    let rows = Box::pin(RecordBatchStreamAdapter::new(schema.clone(), rows));
                    return Ok(sort(rows)?.boxed());
                }
            }
            let kept = top.finish(batch_size)?;
            Ok(futures::stream::iter(kept.into_iter().map(Ok)).boxed())
        })
        .try_flatten()
        .inspect_ok(move |batch| rows_out.add(batch.num_rows()));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            output_schema,
            output,
        )))
    }
}

/// Converts the window's partition keys of `schema` to comparable rows.
fn key_converter(
    schema: &SchemaRef,
    partition_by: &[Arc<dyn PhysicalExpr>],
) -> Result<RowConverter> {
    Ok(RowConverter::new(
        partition_by
            .iter()
            .map(|e| Ok(SortField::new(e.data_type(schema)?)))
            .collect::<Result<_>>()?,
    )?)
}

/// `exprs` evaluated over `batch`, as rows of `converter`.
fn rows_of(
    converter: &RowConverter,
    exprs: impl Iterator<Item = Arc<dyn PhysicalExpr>>,
    batch: &RecordBatch,
) -> Result<Rows> {
    let columns = exprs
        .map(|e| e.evaluate(batch)?.into_array(batch.num_rows()))
        .collect::<Result<Vec<_>>>()?;
    Ok(converter.convert_columns(&columns)?)
}

/// Bytes of a key in the index beside its row (the table's entry, its first kept row).
const KEY_OVERHEAD: usize = 64;
/// Bytes of a kept row in the index beside its order key.
const ROW_OVERHEAD: usize = std::mem::size_of::<Kept>() + 16;

/// [`TopRows`]'s keys, each beside its kept rows in the table's entry: a row's lookup finds
/// the rows it is compared with in the entry it has just read (a miss fewer per row than a
/// list apart, the most of the node's time at SF10).
enum KeyIndex {
    /// One integer or date column: each value beside its rows in the table, compared
    /// without row bytes (nulls apart).
    Ints {
        entries: HashTable<(i64, KeptRows)>,
        null: Option<KeptRows>,
    },
    /// Any other keys, as rows of `converter`, one buffer of them (compared in place on a
    /// lookup), each one's place in it beside its rows, by the hash of its row.
    Rows {
        converter: RowConverter,
        key_rows: Rows,
        entries: HashTable<(u32, KeptRows)>,
    },
}

/// One batch's keys, as the [`KeyIndex`] looks them up.
enum BatchKeys {
    Ints(Int64Array),
    Rows(Rows),
}

impl KeyIndex {
    /// The index for `partition_by`: [`KeyIndex::Ints`] when it is one column of a type that
    /// casts to `i64` without loss.
    fn for_keys(schema: &SchemaRef, partition_by: &[Arc<dyn PhysicalExpr>]) -> Result<Self> {
        if let [expr] = partition_by
            && matches!(
                expr.data_type(schema)?,
                DataType::Int8
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::UInt8
                    | DataType::UInt16
                    | DataType::UInt32
                    | DataType::Date32
            )
        {
            return Ok(KeyIndex::Ints {
                entries: HashTable::new(),
                null: None,
            });
        }
        let converter = key_converter(schema, partition_by)?;
        Ok(KeyIndex::Rows {
            key_rows: converter.empty_rows(0, 0),
            converter,
            entries: HashTable::new(),
        })
    }

    /// `partition_by` over `batch`, as this index compares keys.
    fn keys_of(
        &self,
        partition_by: &[Arc<dyn PhysicalExpr>],
        batch: &RecordBatch,
    ) -> Result<BatchKeys> {
        Ok(match self {
            KeyIndex::Ints { .. } => {
                let values = partition_by[0]
                    .evaluate(batch)?
                    .into_array(batch.num_rows())?;
                let values = datafusion::arrow::compute::cast(&values, &DataType::Int64)?;
                BatchKeys::Ints(values.as_primitive::<Int64Type>().clone())
            }
            KeyIndex::Rows { converter, .. } => {
                BatchKeys::Rows(rows_of(converter, partition_by.iter().cloned(), batch)?)
            }
        })
    }

    /// The kept rows of the key of `keys[row]`: empty for a key not seen before (then
    /// added).
    fn rows_of_key(
        &mut self,
        keys: &BatchKeys,
        row: usize,
        hasher: &DefaultHashBuilder,
    ) -> &mut KeptRows {
        match (self, keys) {
            (KeyIndex::Ints { null, .. }, BatchKeys::Ints(values)) if values.is_null(row) => {
                null.get_or_insert_with(KeptRows::new)
            }
            (KeyIndex::Ints { entries, .. }, BatchKeys::Ints(values)) => {
                let value = values.value(row);
                let entry = entries.entry(
                    hasher.hash_one(value),
                    |(v, _)| *v == value,
                    |(v, _)| hasher.hash_one(*v),
                );
                &mut entry
                    .or_insert_with(|| (value, KeptRows::new()))
                    .into_mut()
                    .1
            }
            (
                KeyIndex::Rows {
                    key_rows, entries, ..
                },
                BatchKeys::Rows(rows),
            ) => {
                let key = rows.row(row);
                let entry = entries.entry(
                    hasher.hash_one(key.data()),
                    |(n, _)| key_rows.row(*n as usize).data() == key.data(),
                    |(n, _)| hasher.hash_one(key_rows.row(*n as usize).data()),
                );
                let entry = entry.or_insert_with(|| {
                    let n = key_rows.num_rows() as u32;
                    key_rows.push(key);
                    (n, KeptRows::new())
                });
                &mut entry.into_mut().1
            }
            _ => unreachable!("a batch's keys are taken by the index that reads them"),
        }
    }

    /// Every key's kept rows, in no particular order.
    fn all_kept(&mut self) -> Box<dyn Iterator<Item = &mut KeptRows> + '_> {
        match self {
            KeyIndex::Ints { entries, null } => {
                Box::new(entries.iter_mut().map(|(_, kept)| kept).chain(null))
            }
            KeyIndex::Rows { entries, .. } => Box::new(entries.iter_mut().map(|(_, kept)| kept)),
        }
    }

    /// Keys held.
    fn len(&self) -> usize {
        match self {
            KeyIndex::Ints { entries, null } => entries.len() + usize::from(null.is_some()),
            KeyIndex::Rows { entries, .. } => entries.len(),
        }
    }

    /// Bytes of the key rows held (the table's entries are in `KEY_OVERHEAD`).
    fn size(&self) -> usize {
        match self {
            KeyIndex::Ints { .. } => 0,
            KeyIndex::Rows { key_rows, .. } => key_rows.size(),
        }
    }
}

/// A row's order key (compares as the window orders). Up to 16 bytes (a date and an integer
/// are 14) it is held in place, not allocated apart: a replaced row's key is read without a
/// second cache miss.
type OrderKey = SmallVec<[u8; 16]>;

/// A kept row: its order key and where it is held.
struct Kept {
    order: OrderKey,
    batch: u32,
    row: u32,
}

/// One key's kept rows, at most K; the first in place (K = 1 allocates nothing per key).
type KeptRows = SmallVec<[Kept; 1]>;

/// The first `k` rows of each key seen so far, held as slices of the batches they came in.
struct TopRows {
    partition_by: Vec<Arc<dyn PhysicalExpr>>,
    order_by: Vec<PhysicalSortExpr>,
    k: usize,
    keys: KeyIndex,
    orders: RowConverter,
    hasher: DefaultHashBuilder,
    /// Rows that were first of their key when they came; some replaced since.
    held: Vec<RecordBatch>,
    held_rows: usize,
    held_bytes: usize,
    live_rows: usize,
    /// Rows pushed, kept or not.
    rows_read: usize,
    /// Bytes of the index's entries and kept rows, estimated.
    index_bytes: usize,
    reservation: MemoryReservation,
}

impl TopRows {
    fn new(
        schema: &SchemaRef,
        partition_by: Vec<Arc<dyn PhysicalExpr>>,
        order_by: Vec<PhysicalSortExpr>,
        k: usize,
        reservation: MemoryReservation,
    ) -> Result<Self> {
        let keys = KeyIndex::for_keys(schema, &partition_by)?;
        let orders = RowConverter::new(
            order_by
                .iter()
                .map(|e| {
                    Ok(SortField::new_with_options(
                        e.expr.data_type(schema)?,
                        e.options,
                    ))
                })
                .collect::<Result<_>>()?,
        )?;
        Ok(TopRows {
            partition_by,
            order_by,
            k: k.max(1),
            hasher: DefaultHashBuilder::default(),
            keys,
            orders,
            held: Vec::new(),
            held_rows: 0,
            held_bytes: 0,
            live_rows: 0,
            rows_read: 0,
            index_bytes: 0,
            reservation,
        })
    }

    /// Takes `batch`'s rows that are among the first of their key so far. Gives the memory
    /// pool's refusal when the pool will not count what that holds (nothing is lost then:
    /// see [`TopRows::into_held`]).
    fn push(&mut self, batch: &RecordBatch) -> Result<Option<DataFusionError>> {
        if batch.num_rows() == 0 {
            return Ok(None);
        }
        self.rows_read += batch.num_rows();
        let keys = self.keys.keys_of(&self.partition_by, batch)?;
        let orders = rows_of(
            &self.orders,
            self.order_by.iter().map(|e| e.expr.clone()),
            batch,
        )?;
        let slot = self.held.len() as u32;
        let mut taken: Vec<u32> = Vec::new();
        for row in 0..batch.num_rows() {
            let order = orders.row(row).data();
            let place = || Kept {
                order: OrderKey::from_slice(order),
                batch: slot,
                row: taken.len() as u32,
            };
            let rows = self.keys.rows_of_key(&keys, row, &self.hasher);
            if rows.len() < self.k {
                if rows.is_empty() {
                    self.index_bytes += KEY_OVERHEAD;
                }
                self.index_bytes += ROW_OVERHEAD + order.len();
                rows.push(place());
                self.live_rows += 1;
            } else {
                let (last, _) = rows
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.order.cmp(&b.1.order))
                    .expect("k > 0 rows");
                let replaced = &mut rows[last];
                if *order >= *replaced.order {
                    continue;
                }
                if replaced.order.len() == order.len() {
                    replaced.order.copy_from_slice(order);
                } else {
                    self.index_bytes = self.index_bytes + order.len() - replaced.order.len();
                    replaced.order = OrderKey::from_slice(order);
                }
                (replaced.batch, replaced.row) = (slot, taken.len() as u32);
            }
            taken.push(row as u32);
        }
        if !taken.is_empty() {
            self.held_rows += taken.len();
            let held = take_record_batch(batch, &UInt32Array::from(taken))?;
            self.held_bytes += held.get_array_memory_size();
            self.held.push(held);
        }
        if self.held_rows > 2 * self.live_rows + 8192 {
            self.compact()?;
        }
        Ok(self.reservation.try_resize(self.memory()).err())
    }

    /// Bytes held: the rows, the keys and the index.
    fn memory(&self) -> usize {
        self.held_bytes + self.index_bytes + self.keys.size()
    }

    /// Gathers the kept rows into one batch, dropping those replaced since they came.
    fn compact(&mut self) -> Result<()> {
        let mut from = Vec::with_capacity(self.live_rows);
        for (i, place) in self.keys.all_kept().flatten().enumerate() {
            from.push((place.batch as usize, place.row as usize));
            (place.batch, place.row) = (0, i as u32);
        }
        let batches: Vec<&RecordBatch> = self.held.iter().collect();
        let gathered = match batches.first() {
            Some(first) if from.is_empty() => first.slice(0, 0),
            Some(_) => interleave_record_batch(&batches, &from)?,
            None => return Ok(()),
        };
        self.held_bytes = gathered.get_array_memory_size();
        self.held = vec![gathered];
        self.held_rows = self.live_rows;
        Ok(())
    }

    /// Keys held so far.
    fn keys_held(&self) -> usize {
        self.keys.len()
    }

    /// Every row held, replaced ones included: a superset of the first rows of each key.
    fn into_held(self) -> Vec<RecordBatch> {
        self.held
    }

    /// The first rows of each key, in batches of at most `batch_size` rows.
    fn finish(mut self, batch_size: usize) -> Result<Vec<RecordBatch>> {
        self.compact()?;
        let Some(all) = self.held.pop() else {
            return Ok(Vec::new());
        };
        let batch_size = batch_size.max(1);
        Ok((0..all.num_rows())
            .step_by(batch_size)
            .map(|at| all.slice(at, batch_size.min(all.num_rows() - at)))
            .collect())
    }
}

/// The physical optimizer rule of the module documentation.
#[derive(Debug, Default)]
pub struct WindowTopK;

impl PhysicalOptimizerRule for WindowTopK {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            Ok(match with_top_k_below_sort(&node, config)? {
                Some(rewritten) => Transformed::yes(rewritten),
                None => Transformed::no(node),
            })
        })
        .data()
    }

    fn name(&self) -> &str {
        "nightshift_window_top_k"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// `filter` with a [`PartitionTopKExec`] below its window's sort, when the pattern of the
/// module documentation matches.
fn with_top_k_below_sort(
    filter: &Arc<dyn ExecutionPlan>,
    config: &ConfigOptions,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let Some(filter_exec) = filter.as_any().downcast_ref::<FilterExec>() else {
        return Ok(None);
    };
    let window = filter_exec.input();
    let (exprs, window_input) =
        if let Some(w) = window.as_any().downcast_ref::<BoundedWindowAggExec>() {
            (w.window_expr(), w.input())
        } else if let Some(w) = window.as_any().downcast_ref::<WindowAggExec>() {
            (w.window_expr(), w.input())
        } else {
            return Ok(None);
        };
    let [expr] = exprs else {
        return Ok(None);
    };
    if !is_row_number(expr) || expr.partition_by().is_empty() || expr.order_by().is_empty() {
        return Ok(None);
    }
    let row_number_column = window_input.schema().fields().len();
    let Some(k) = rows_kept(filter_exec.predicate(), row_number_column) else {
        return Ok(None);
    };
    let Some(sort) = window_input.as_any().downcast_ref::<SortExec>() else {
        return Ok(None);
    };
    if sort.fetch().is_some() || sort.input().as_any().is::<PartitionTopKExec>() {
        return Ok(None);
    }
    let top_k = |input: Arc<dyn ExecutionPlan>, mode: TopKMode| -> Arc<dyn ExecutionPlan> {
        Arc::new(PartitionTopKExec::new(
            input,
            expr.partition_by().to_vec(),
            expr.order_by().to_vec(),
            k,
            mode,
        ))
    };
    let single_process = config
        .extensions
        .get::<NightshiftOptions>()
        .is_some_and(|o| o.single_process);
    let mut below_sort = sort.input().clone();
    if let Some(shuffle) = below_sort.as_any().downcast_ref::<RepartitionExec>()
        && matches!(shuffle.partitioning(), Partitioning::Hash(..))
        && !single_process
    {
        let before = top_k(shuffle.input().clone(), TopKMode::BeforeShuffle);
        below_sort = below_sort.clone().with_new_children(vec![before])?;
    }
    let window = if k == 1 {
        // Every row left is the first of its key: its row number is 1, with no sort.
        numbered_one(top_k(below_sort, TopKMode::Exact), window)?
    } else {
        let sort = window_input
            .clone()
            .with_new_children(vec![top_k(below_sort, TopKMode::AtLeast)])?;
        window.clone().with_new_children(vec![sort])?
    };
    Ok(Some(filter.clone().with_new_children(vec![window])?))
}

/// `input`'s columns and a row number of 1, in the schema of `window`.
fn numbered_one(
    input: Arc<dyn ExecutionPlan>,
    window: &Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let schema = window.schema();
    let (number, columns) = schema.fields().split_last().expect("a window column");
    let mut exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = columns
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new(f.name(), i));
            (column, f.name().clone())
        })
        .collect();
    let one = ScalarValue::UInt64(Some(1)).cast_to(number.data_type())?;
    exprs.push((Arc::new(Literal::new(one)), number.name().clone()));
    Ok(Arc::new(ProjectionExec::try_new(exprs, input)?))
}

fn is_row_number(expr: &Arc<dyn WindowExpr>) -> bool {
    expr.as_any()
        .downcast_ref::<StandardWindowExpr>()
        .and_then(|e| {
            e.get_standard_func_expr()
                .as_any()
                .downcast_ref::<WindowUDFExpr>()
        })
        .is_some_and(|e| e.fun().name() == "row_number")
}

/// The K such that `predicate` keeps only rows whose `column` (a row number) is at most K:
/// a conjunct `column = n`, `column <= n` or `column < n + 1` (either way round), n ≤
/// [`MAX_TOP_K`].
pub fn rows_kept(predicate: &Arc<dyn PhysicalExpr>, column: usize) -> Option<usize> {
    split_conjunction(predicate)
        .into_iter()
        .filter_map(|conjunct| {
            let binary = conjunct.as_any().downcast_ref::<BinaryExpr>()?;
            let (op, n) = if is_column(binary.left(), column) {
                (*binary.op(), integer(binary.right())?)
            } else if is_column(binary.right(), column) {
                (binary.op().swap()?, integer(binary.left())?)
            } else {
                return None;
            };
            let k = match op {
                Operator::Eq | Operator::LtEq => n,
                Operator::Lt => n.checked_sub(1)?,
                _ => return None,
            };
            (1..=MAX_TOP_K as i64).contains(&k).then_some(k as usize)
        })
        .min()
}

fn is_column(expr: &Arc<dyn PhysicalExpr>, index: usize) -> bool {
    let any = expr.as_any();
    if let Some(column) = any.downcast_ref::<Column>() {
        return column.index() == index;
    }
    if let Some(cast) = any.downcast_ref::<CastExpr>() {
        return is_column(cast.expr(), index);
    }
    if let Some(cast) = any.downcast_ref::<TryCastExpr>() {
        return is_column(cast.expr(), index);
    }
    false
}

fn integer(expr: &Arc<dyn PhysicalExpr>) -> Option<i64> {
    let literal = expr.as_any().downcast_ref::<Literal>()?;
    match literal.value().cast_to(&DataType::Int64).ok()? {
        ScalarValue::Int64(Some(n)) => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{SessionOptions, new_session};
    use datafusion::arrow::array::{Int32Array, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::datasource::MemTable;
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::physical_plan::{collect, displayable};
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// Rows of a nightly dedupe: keys with nulls and non-ASCII text, times with nulls and
    /// repeats, unique ids; in several batches over two partitions.
    fn table() -> MemTable {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, true),
            Field::new("g", DataType::Int32, false),
            Field::new("ts", DataType::Int64, true),
            Field::new("id", DataType::Int64, false),
        ]));
        let names = ["é", "日本", "ß", "a", "ab", "abc", "x y"];
        let mut seed: u64 = 7;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut partitions = vec![Vec::new(), Vec::new()];
        for b in 0..12 {
            let rows = if b == 5 { 0 } else { 700 };
            let base = b as i64 * 1000;
            let k: StringArray = (0..rows)
                .map(|_| match next(20) as usize {
                    0 => None,
                    i => Some(format!("{}{}", names[i % names.len()], i % 3)),
                })
                .collect();
            let g: Int32Array = (0..rows).map(|_| next(3) as i32).collect();
            let ts: Int64Array = (0..rows)
                .map(|_| (next(10) != 0).then(|| next(50) as i64))
                .collect();
            let id: Int64Array = (0..rows).map(|i| base + i).collect();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(k), Arc::new(g), Arc::new(ts), Arc::new(id)],
            )
            .unwrap();
            partitions[b % 2].push(batch);
        }
        MemTable::try_new(schema, partitions).unwrap()
    }

    fn contexts() -> (SessionContext, SessionContext) {
        let ours = new_session(SessionOptions {
            partitions: 3,
            batch_size: 256,
            ..Default::default()
        });
        let plain = SessionContext::new_with_config(
            SessionConfig::new()
                .with_target_partitions(3)
                .with_batch_size(256),
        );
        for ctx in [&ours, &plain] {
            ctx.register_table("t", Arc::new(table())).unwrap();
        }
        (ours, plain)
    }

    async fn run(ctx: &SessionContext, sql: &str) -> (String, Vec<String>) {
        let frame = ctx.sql(sql).await.unwrap();
        let plan = frame.create_physical_plan().await.unwrap();
        let shown = displayable(plan.as_ref()).indent(true).to_string();
        let batches = collect(plan, ctx.task_ctx()).await.unwrap();
        let text = pretty_format_batches(&batches).unwrap().to_string();
        let mut rows: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("| ") && !l.contains(" id "))
            .map(str::to_string)
            .collect();
        rows.sort();
        (shown, rows)
    }

    fn dedupe(partition_by: &str, order_by: &str, filter: &str) -> String {
        format!(
            "SELECT k, g, ts, id, rn FROM (SELECT k, g, ts, id, ROW_NUMBER() OVER \
             (PARTITION BY {partition_by} ORDER BY {order_by}) AS rn FROM t) WHERE {filter}"
        )
    }

    #[tokio::test]
    async fn the_first_rows_of_each_key_are_those_plain_datafusion_keeps() {
        let (ours, plain) = contexts();
        for sql in [
            dedupe("k", "ts DESC, id DESC", "rn = 1"),
            dedupe("k, g", "ts ASC NULLS FIRST, id", "rn <= 3"),
            dedupe("k", "ts, id DESC", "rn < 3 AND id % 2 = 0"),
            dedupe("g", "id", "2 >= rn"),
            dedupe("k", "ts DESC NULLS LAST, id", "rn = 2"),
            dedupe("upper(k)", "id", "rn = 1 AND rn <= 5"),
            // One integer key column (its values kept in the table), nulls among them.
            dedupe("ts", "id DESC", "rn = 1"),
            dedupe("ts", "g, id", "rn <= 3"),
            dedupe("ts * -4000000000000", "id", "rn = 1"),
        ] {
            let (shown, rows) = run(&ours, &sql).await;
            assert!(shown.contains("PartitionTopKExec"), "{sql}\n{shown}");
            let (_, expected) = run(&plain, &sql).await;
            assert!(!expected.is_empty(), "{sql}");
            assert_eq!(rows, expected, "{sql}\n{shown}");
        }
    }

    #[tokio::test]
    async fn windows_that_see_the_whole_partition_are_left_alone() {
        let (ours, plain) = contexts();
        for sql in [
            // A running sum beside the row number needs every row of the partition.
            "SELECT k, id, rn, s FROM (SELECT k, id, ROW_NUMBER() OVER (PARTITION BY k ORDER BY id) AS rn, \
             SUM(id) OVER (PARTITION BY k ORDER BY id) AS s FROM t) WHERE rn = 1"
                .to_string(),
            // Ranks keep ties; a filter that does not bound the number from above.
            "SELECT k, id, r FROM (SELECT k, id, RANK() OVER (PARTITION BY k ORDER BY ts) AS r FROM t) WHERE r = 1"
                .to_string(),
            dedupe("k", "id", "rn > 1 AND rn < 4 OR rn = 7"),
            dedupe("k", "id", "rn >= 2"),
            dedupe("k", "id", &format!("rn <= {}", MAX_TOP_K + 1)),
        ] {
            let (shown, rows) = run(&ours, &sql).await;
            assert!(!shown.contains("PartitionTopKExec"), "{sql}\n{shown}");
            let (_, expected) = run(&plain, &sql).await;
            assert_eq!(rows, expected, "{sql}");
        }
    }

    #[test]
    fn the_bound_is_read_from_either_side_of_the_comparison() {
        let rn = || -> Arc<dyn PhysicalExpr> { Arc::new(Column::new("rn", 4)) };
        let n = |v: i64| -> Arc<dyn PhysicalExpr> {
            Arc::new(Literal::new(ScalarValue::UInt64(Some(v as u64))))
        };
        let cmp = |l, op, r| -> Arc<dyn PhysicalExpr> { Arc::new(BinaryExpr::new(l, op, r)) };
        assert_eq!(rows_kept(&cmp(rn(), Operator::Eq, n(1)), 4), Some(1));
        assert_eq!(rows_kept(&cmp(n(5), Operator::Gt, rn()), 4), Some(4));
        assert_eq!(rows_kept(&cmp(rn(), Operator::Lt, n(1)), 4), None);
        assert_eq!(rows_kept(&cmp(rn(), Operator::Eq, n(1)), 3), None);
        assert_eq!(rows_kept(&cmp(rn(), Operator::GtEq, n(1)), 4), None);
        let lowest: Arc<dyn PhysicalExpr> =
            Arc::new(Literal::new(ScalarValue::Int64(Some(i64::MIN))));
        assert_eq!(rows_kept(&cmp(rn(), Operator::Lt, lowest), 4), None);
        let both = cmp(
            cmp(rn(), Operator::LtEq, n(9)),
            Operator::And,
            cmp(rn(), Operator::Lt, n(4)),
        );
        assert_eq!(rows_kept(&both, 4), Some(3));
        let either = cmp(
            cmp(rn(), Operator::LtEq, n(9)),
            Operator::Or,
            cmp(rn(), Operator::Lt, n(4)),
        );
        assert_eq!(rows_kept(&either, 4), None);
    }

    fn top_k_over(batches: Vec<RecordBatch>, k: usize, mode: TopKMode) -> Arc<dyn ExecutionPlan> {
        let schema = batches[0].schema();
        let scan = MemorySourceConfig::try_new_exec(&[batches], schema.clone(), None).unwrap();
        let column = |name: &str| -> Arc<dyn PhysicalExpr> {
            Arc::new(Column::new_with_schema(name, &schema).unwrap())
        };
        Arc::new(PartitionTopKExec::new(
            scan,
            vec![column("k")],
            vec![PhysicalSortExpr {
                expr: column("id"),
                options: Default::default(),
            }],
            k,
            mode,
        ))
    }

    /// `rows` rows of 10 keys (`k`), ids (`id`) descending.
    fn batches_of(rows: usize) -> Vec<RecordBatch> {
        batches_with_keys(rows, 10)
    }

    fn batches_with_keys(rows: usize, keys: i64) -> Vec<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("id", DataType::Int64, false),
        ]));
        (0..rows as i64)
            .collect::<Vec<_>>()
            .chunks(1000)
            .map(|ids| {
                let keys: Int64Array = ids.iter().map(|i| i % keys).collect();
                let ids: Int64Array = ids.iter().rev().copied().collect();
                RecordBatch::try_new(schema.clone(), vec![Arc::new(keys), Arc::new(ids)]).unwrap()
            })
            .collect()
    }

    async fn rows_out(plan: Arc<dyn ExecutionPlan>, memory: Option<usize>) -> Result<usize> {
        Ok(run_top_k(plan, memory)
            .await?
            .iter()
            .map(|b| b.num_rows())
            .sum())
    }

    async fn run_top_k(
        plan: Arc<dyn ExecutionPlan>,
        memory: Option<usize>,
    ) -> Result<Vec<RecordBatch>> {
        let mut runtime = RuntimeEnvBuilder::new();
        if let Some(bytes) = memory {
            runtime = runtime.with_memory_limit(bytes, 1.0);
        }
        let config = SessionConfig::new()
            .with_batch_size(100)
            .set_u64("datafusion.execution.sort_spill_reservation_bytes", 8 << 10);
        let ctx = SessionContext::new_with_config_rt(config, runtime.build_arc().unwrap());
        collect(plan, ctx.task_ctx()).await
    }

    #[tokio::test]
    async fn a_key_keeps_k_rows_and_a_refusing_pool_lets_every_row_through() {
        // 10 keys, 3 rows each kept, out of 50,000 rows in 50 batches (compaction runs).
        for mode in [TopKMode::AtLeast, TopKMode::Exact, TopKMode::BeforeShuffle] {
            let kept = rows_out(top_k_over(batches_of(50_000), 3, mode), None).await;
            assert_eq!(kept.unwrap(), 30);
            let kept = rows_out(top_k_over(batches_of(1), 3, mode), None).await;
            assert_eq!(kept.unwrap(), 1);
        }
        // With no memory to hold rows, the node passes on what it held and the rest: no
        // row the window could number is lost, and the task does not fail.
        let passed = rows_out(top_k_over(batches_of(5_000), 3, TopKMode::AtLeast), Some(1))
            .await
            .unwrap();
        assert!(passed > 30, "{passed}");
        assert!(passed <= 5_000, "{passed}");
    }

    #[tokio::test]
    async fn an_exact_node_past_its_memory_sorts_with_spill_and_keeps_the_same_rows() {
        // 20,000 keys: far more than 256 KiB holds one entry each.
        for k in [1, 2] {
            let plan = top_k_over(batches_with_keys(60_000, 20_000), k, TopKMode::Exact);
            let spilled = run_top_k(plan.clone(), Some(256 << 10)).await.unwrap();
            let in_memory = run_top_k(plan, None).await.unwrap();
            let rows = |batches: &[RecordBatch]| -> Vec<(i64, i64)> {
                let mut rows: Vec<(i64, i64)> = batches
                    .iter()
                    .flat_map(|b| {
                        let column = |i: usize| {
                            b.column(i)
                                .as_any()
                                .downcast_ref::<Int64Array>()
                                .unwrap()
                                .values()
                                .to_vec()
                        };
                        column(0).into_iter().zip(column(1))
                    })
                    .collect();
                rows.sort();
                rows
            };
            let (spilled, in_memory) = (rows(&spilled), rows(&in_memory));
            assert_eq!(spilled, in_memory);
            // Each key's `k` smallest ids, counted the long way.
            let all = rows(&batches_with_keys(60_000, 20_000));
            let expected: Vec<(i64, i64)> = all
                .chunk_by(|a, b| a.0 == b.0)
                .flat_map(|run| run.iter().take(k).copied())
                .collect();
            assert_eq!(expected.len(), 20_000 * k);
            assert_eq!(spilled, expected);
        }
        // With no memory even to sort, the task fails, naming the sort and the limit.
        let err = rows_out(top_k_over(batches_of(5_000), 1, TopKMode::Exact), Some(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("Resources exhausted"), "{err}");
    }

    #[test]
    fn holding_rows_before_a_shuffle_pays_while_it_drops_a_fifth_of_them() {
        assert!(holding_pays(100_000, 0));
        assert!(holding_pays(100_000, 80_000));
        assert!(!holding_pays(100_000, 80_001));
        assert!(!holding_pays(100_000, 100_000));
        // The latest order per customer at SF10: a task's first 101,942 rows kept 96,311.
        assert!(!holding_pays(101_942, 96_311));
        assert!(!holding_pays(usize::MAX, usize::MAX));
    }

    #[tokio::test]
    async fn a_top_k_before_a_shuffle_passes_rows_on_once_it_keeps_most_of_them() {
        // Keys nearly all distinct: 100 k rows read keep 90 k, so after its probe the node
        // holds nothing and every later row passes. Each key's first row is among them.
        let rows = 150_000;
        let distinct = batches_with_keys(rows, 90_000);
        for mode in [TopKMode::BeforeShuffle, TopKMode::AtLeast] {
            let out = run_top_k(top_k_over(distinct.clone(), 1, mode), None)
                .await
                .unwrap();
            let passed: usize = out.iter().map(|b| b.num_rows()).sum();
            match mode {
                TopKMode::BeforeShuffle => assert_eq!(passed, 90_000 + (rows - 100_000)),
                _ => assert_eq!(passed, 90_000),
            }
            let smallest_ids = |batches: &[RecordBatch]| {
                let mut smallest = std::collections::HashMap::<i64, i64>::new();
                for batch in batches {
                    let column = |i: usize| batch.column(i).as_primitive::<Int64Type>().clone();
                    for (key, id) in column(0).values().iter().zip(column(1).values()) {
                        let first = smallest.entry(*key).or_insert(*id);
                        *first = (*first).min(*id);
                    }
                }
                smallest
            };
            let kept = smallest_ids(&out);
            assert_eq!(kept.len(), 90_000);
            assert_eq!(kept, smallest_ids(&distinct));
        }
        // Ten keys: it holds on, and passes on ten rows.
        let few = rows_out(
            top_k_over(batches_of(rows), 1, TopKMode::BeforeShuffle),
            None,
        )
        .await;
        assert_eq!(few.unwrap(), 10);
    }

    #[test]
    fn the_node_survives_the_task_codec() {
        for (mode, shown_as) in [
            (TopKMode::Exact, "PartitionTopKExec: k=2 (exact),"),
            (TopKMode::AtLeast, "PartitionTopKExec: k=2,"),
            (
                TopKMode::BeforeShuffle,
                "PartitionTopKExec: k=2 (before shuffle),",
            ),
        ] {
            let plan = top_k_over(batches_of(10), 2, mode);
            let sort = Arc::new(SortExec::new(
                datafusion::physical_expr::LexOrdering::new(vec![PhysicalSortExpr {
                    expr: Arc::new(Column::new("id", 1)),
                    options: Default::default(),
                }])
                .unwrap(),
                plan,
            ));
            let encoded = crate::codec::encode_plan(sort.clone()).unwrap();
            let ctx = SessionContext::new();
            let decoded = crate::codec::decode_plan(&encoded, &ctx.task_ctx()).unwrap();
            let shown =
                |p: &Arc<dyn ExecutionPlan>| displayable(p.as_ref()).indent(true).to_string();
            let sort: Arc<dyn ExecutionPlan> = sort;
            assert!(shown(&decoded).contains(shown_as), "{}", shown(&decoded));
            assert_eq!(shown(&decoded), shown(&sort));
        }
    }
}
