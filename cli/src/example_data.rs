//! Generates the TPC-H tables the examples read (with the `tpchgen` crate), as a nightly
//! extract would land them: orders and customers as Parquet, line items as daily CSV files,
//! nations and regions as CSV.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Builder, Decimal128Builder, Int32Builder, Int64Builder, RecordBatch,
    StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use tpchgen::generators::{
    CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, RegionGenerator,
};

/// What was written.
#[derive(Debug, Default)]
pub struct GeneratedData {
    pub orders: usize,
    pub lineitems: usize,
    pub customers: usize,
    pub files: usize,
}

/// Writes TPC-H data at `scale` (1.0 = 1.5 M orders) under `dir`, split into `parts` files.
pub fn generate(dir: &Path, scale: f64, parts: usize) -> anyhow::Result<GeneratedData> {
    let parts = parts.max(1) as i32;
    let mut out = GeneratedData::default();
    for sub in ["orders", "lineitem"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    for part in 1..=parts {
        let batch = orders(scale, part, parts)?;
        out.orders += batch.num_rows();
        write_parquet(&dir.join(format!("orders/part-{part:03}.parquet")), &batch)?;
        let batch = lineitems(scale, part, parts)?;
        out.lineitems += batch.num_rows();
        write_csv(&dir.join(format!("lineitem/part-{part:03}.csv")), &batch)?;
        out.files += 2;
    }
    let batch = customers(scale)?;
    out.customers = batch.num_rows();
    write_parquet(&dir.join("customer.parquet"), &batch)?;
    write_csv(&dir.join("nation.csv"), &nations()?)?;
    write_csv(&dir.join("region.csv"), &regions()?)?;
    out.files += 3;
    Ok(out)
}

fn decimal(p: u8, s: i8) -> Decimal128Builder {
    Decimal128Builder::new()
        .with_precision_and_scale(p, s)
        .expect("valid decimal")
}

fn batch(fields: Vec<Field>, columns: Vec<ArrayRef>) -> anyhow::Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

fn orders(scale: f64, part: i32, parts: i32) -> anyhow::Result<RecordBatch> {
    let (mut key, mut cust, mut status, mut total, mut date, mut prio) = (
        Int64Builder::new(),
        Int64Builder::new(),
        StringBuilder::new(),
        decimal(15, 2),
        Date32Builder::new(),
        StringBuilder::new(),
    );
    for o in OrderGenerator::new(scale, part, parts).iter() {
        key.append_value(o.o_orderkey);
        cust.append_value(o.o_custkey);
        status.append_value(o.o_orderstatus.to_string());
        total.append_value(o.o_totalprice.into_inner() as i128);
        date.append_value(o.o_orderdate.to_unix_epoch());
        prio.append_value(o.o_orderpriority);
    }
    batch(
        vec![
            Field::new("o_orderkey", DataType::Int64, false),
            Field::new("o_custkey", DataType::Int64, false),
            Field::new("o_orderstatus", DataType::Utf8, false),
            Field::new("o_totalprice", DataType::Decimal128(15, 2), false),
            Field::new("o_orderdate", DataType::Date32, false),
            Field::new("o_orderpriority", DataType::Utf8, false),
        ],
        vec![
            Arc::new(key.finish()),
            Arc::new(cust.finish()),
            Arc::new(status.finish()),
            Arc::new(total.finish()),
            Arc::new(date.finish()),
            Arc::new(prio.finish()),
        ],
    )
}

fn lineitems(scale: f64, part: i32, parts: i32) -> anyhow::Result<RecordBatch> {
    let (mut order, mut line, mut qty, mut price, mut disc, mut flag, mut ship) = (
        Int64Builder::new(),
        Int32Builder::new(),
        Int64Builder::new(),
        decimal(15, 2),
        decimal(15, 2),
        StringBuilder::new(),
        Date32Builder::new(),
    );
    for l in LineItemGenerator::new(scale, part, parts).iter() {
        order.append_value(l.l_orderkey);
        line.append_value(l.l_linenumber);
        qty.append_value(l.l_quantity);
        price.append_value(l.l_extendedprice.into_inner() as i128);
        disc.append_value(l.l_discount.into_inner() as i128);
        flag.append_value(l.l_returnflag);
        ship.append_value(l.l_shipdate.to_unix_epoch());
    }
    batch(
        vec![
            Field::new("l_orderkey", DataType::Int64, false),
            Field::new("l_linenumber", DataType::Int32, false),
            Field::new("l_quantity", DataType::Int64, false),
            Field::new("l_extendedprice", DataType::Decimal128(15, 2), false),
            Field::new("l_discount", DataType::Decimal128(15, 2), false),
            Field::new("l_returnflag", DataType::Utf8, false),
            Field::new("l_shipdate", DataType::Date32, false),
        ],
        vec![
            Arc::new(order.finish()),
            Arc::new(line.finish()),
            Arc::new(qty.finish()),
            Arc::new(price.finish()),
            Arc::new(disc.finish()),
            Arc::new(flag.finish()),
            Arc::new(ship.finish()),
        ],
    )
}

fn customers(scale: f64) -> anyhow::Result<RecordBatch> {
    let (mut key, mut name, mut nation, mut segment) = (
        Int64Builder::new(),
        StringBuilder::new(),
        Int64Builder::new(),
        StringBuilder::new(),
    );
    for c in CustomerGenerator::new(scale, 1, 1).iter() {
        key.append_value(c.c_custkey);
        name.append_value(c.c_name.to_string());
        nation.append_value(c.c_nationkey);
        segment.append_value(c.c_mktsegment);
    }
    batch(
        vec![
            Field::new("c_custkey", DataType::Int64, false),
            Field::new("c_name", DataType::Utf8, false),
            Field::new("c_nationkey", DataType::Int64, false),
            Field::new("c_mktsegment", DataType::Utf8, false),
        ],
        vec![
            Arc::new(key.finish()),
            Arc::new(name.finish()),
            Arc::new(nation.finish()),
            Arc::new(segment.finish()),
        ],
    )
}

fn nations() -> anyhow::Result<RecordBatch> {
    let (mut key, mut name, mut region) = (
        Int64Builder::new(),
        StringBuilder::new(),
        Int64Builder::new(),
    );
    for n in NationGenerator::new(1.0, 1, 1).iter() {
        key.append_value(n.n_nationkey);
        name.append_value(n.n_name);
        region.append_value(n.n_regionkey);
    }
    batch(
        vec![
            Field::new("n_nationkey", DataType::Int64, false),
            Field::new("n_name", DataType::Utf8, false),
            Field::new("n_regionkey", DataType::Int64, false),
        ],
        vec![
            Arc::new(key.finish()),
            Arc::new(name.finish()),
            Arc::new(region.finish()),
        ],
    )
}

fn regions() -> anyhow::Result<RecordBatch> {
    let (mut key, mut name) = (Int64Builder::new(), StringBuilder::new());
    for r in RegionGenerator::new(1.0, 1, 1).iter() {
        key.append_value(r.r_regionkey);
        name.append_value(r.r_name);
    }
    batch(
        vec![
            Field::new("r_regionkey", DataType::Int64, false),
            Field::new("r_name", DataType::Utf8, false),
        ],
        vec![Arc::new(key.finish()), Arc::new(name.finish())],
    )
}

/// Writes one Parquet file.
pub fn write_parquet(path: &Path, batch: &RecordBatch) -> anyhow::Result<()> {
    let mut writer = ArrowWriter::try_new(File::create(path)?, batch.schema(), None)?;
    writer.write(batch)?;
    writer.close()?;
    Ok(())
}

/// Writes one CSV file with a header.
pub fn write_csv(path: &Path, batch: &RecordBatch) -> anyhow::Result<()> {
    let mut writer = arrow::csv::WriterBuilder::new()
        .with_header(true)
        .build(File::create(path)?);
    writer.write(batch)?;
    Ok(())
}
