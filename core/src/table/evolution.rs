//! Schema evolution of the target: how a run's result may differ from the table's schema.
//! Decided when the job plans (the workers write their files with the evolved schema's
//! field ids) and committed with the job's snapshot, in the same metadata swap.

use std::fmt::Write as _;
use std::sync::Arc;

use iceberg::spec::{
    ListType, MapType, NestedField, NestedFieldRef, PrimitiveType, Schema, StructType,
    TableMetadata, Type,
};
use iceberg::table::Table;
use iceberg::{TableRequirement, TableUpdate};
use nightshift_spec::SchemaEvolution;

use crate::error::{CoreError, Result};

/// A schema the job's files are written with that the table does not have yet.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaChange {
    /// The table's current schema id and last assigned column id when the job planned: the
    /// change applies on exactly that schema.
    pub base_schema_id: i32,
    pub base_last_column_id: i32,
    /// The evolved schema: the table's columns (some widened) and the added ones, with new
    /// field ids after `base_last_column_id`. Its schema id is settled by the commit.
    pub schema: Schema,
    /// What changed, one line each (`added note: string`, `widened qty: int -> long`).
    pub changes: Vec<String>,
    /// The table has no snapshot (a first run created it and stopped before its commit): the
    /// schema is replaced, columns retyped and dropped as the result has them, and the
    /// change only lands on a table that still has no snapshot.
    pub replaces_empty: bool,
}

/// How one column of the result stands against the table's column of that name.
#[derive(Debug, Clone, PartialEq)]
enum Fit {
    Same,
    /// Narrower than the table's (int into long): written converted, no change.
    Converted,
    Widened(Type),
    Added,
    Refused(String),
}

const NEEDS_EVOLUTION: &str = "needs schema_evolution = \"add_columns\"";

/// Compares the result's schema (as [`super::iceberg_schema_for`] maps it) with the table's
/// current one. `Ok(None)`: the result fits as it is. `Ok(Some(change))`: the policy allows
/// the differences and `change` holds the evolved schema. Otherwise an error that shows both
/// schemas side by side with the reason on each refused column.
pub fn plan_schema_change(
    table: &str,
    metadata: &TableMetadata,
    result: &Schema,
    policy: SchemaEvolution,
) -> Result<Option<SchemaChange>> {
    let current = metadata.current_schema();
    let partition_values = columns_holding_partition_values(metadata);
    let fits: Vec<(&str, Option<&Type>, Option<&Type>, Fit)> = current
        .as_struct()
        .fields()
        .iter()
        .map(|column| {
            let theirs = result.field_by_name(&column.name);
            let fit = match theirs {
                Some(r) => fit_existing(&column.field_type, &r.field_type, policy),
                None => Fit::Refused("the result lacks this column".into()),
            };
            let fit = match fit {
                Fit::Widened(wider)
                    if partition_values.contains(&column.id)
                        && !matches!(wider, Type::Primitive(PrimitiveType::Decimal { .. })) =>
                {
                    Fit::Refused(format!(
                        "its values are partition values (identity or truncate), and files written before would keep {} ones, which this version cannot replace: cast it to {} in the SQL",
                        column.field_type, column.field_type
                    ))
                }
                fit => fit,
            };
            (
                column.name.as_str(),
                Some(column.field_type.as_ref()),
                theirs.map(|r| r.field_type.as_ref()),
                fit,
            )
        })
        .chain(
            result
                .as_struct()
                .fields()
                .iter()
                .filter(|r| current.field_by_name(&r.name).is_none())
                .map(|r| {
                    let fit = match policy {
                        SchemaEvolution::AddColumns => Fit::Added,
                        SchemaEvolution::None => {
                            Fit::Refused(format!("a new column: {NEEDS_EVOLUTION}"))
                        }
                    };
                    (r.name.as_str(), None, Some(r.field_type.as_ref()), fit)
                }),
        )
        .collect();
    let changes_table = fits
        .iter()
        .any(|(.., fit)| matches!(fit, Fit::Refused(_) | Fit::Widened(_) | Fit::Added));
    if changes_table && metadata.snapshots().len() == 0 {
        return replacement_of_empty(table, metadata, result).map(Some);
    }
    if fits.iter().any(|(.., fit)| matches!(fit, Fit::Refused(_))) {
        return Err(CoreError::Target {
            table: table.to_string(),
            message: side_by_side(&fits, policy),
        });
    }
    if !fits
        .iter()
        .any(|(.., fit)| matches!(fit, Fit::Widened(_) | Fit::Added))
    {
        return Ok(None);
    }
    let mut next_id = metadata.last_column_id();
    let mut fields: Vec<NestedFieldRef> = Vec::new();
    let mut changes = Vec::new();
    for (name, ours, theirs, fit) in &fits {
        match fit {
            Fit::Widened(wider) => {
                let column = current.field_by_name(name).expect("a table column");
                let mut widened = column.as_ref().clone();
                widened.field_type = Box::new(wider.clone());
                fields.push(Arc::new(widened));
                changes.push(format!(
                    "widened {name}: {} -> {wider}",
                    ours.expect("a table column")
                ));
            }
            Fit::Added => {
                let column = new_column(name, theirs.expect("a result column"), &mut next_id);
                changes.push(format!("added {name}: {}", column.field_type));
                fields.push(column);
            }
            _ => fields.push(current.field_by_name(name).expect("a table column").clone()),
        }
    }
    let schema = Schema::builder()
        .with_schema_id(current.schema_id())
        .with_fields(fields)
        .with_identifier_field_ids(current.identifier_field_ids())
        .build()
        .map_err(|e| CoreError::Target {
            table: table.to_string(),
            message: format!("cannot evolve the schema: {e}"),
        })?;
    Ok(Some(SchemaChange {
        base_schema_id: current.schema_id(),
        base_last_column_id: metadata.last_column_id(),
        schema,
        changes,
        replaces_empty: false,
    }))
}

/// The schema a table with no snapshot takes for `result`, whatever the spec's
/// `schema_evolution`: no file was ever committed to it, so none can read a column wrongly.
/// (A first run that stopped after creating the table left it, with the schema of that
/// run's code; a fixed spec's run had to match it.) The columns are the result's, in its
/// order. A column of a table column's name keeps that column's field id when its type is
/// the same or one Iceberg widens it to; otherwise it gets a fresh id, as a new column does.
/// So a file written for the old schema (by a run of the old code committing after this
/// one) still reads right: a retyped column is absent from it (NULL), never read as another
/// type. A column the partition spec takes its values from cannot get a fresh id (the spec
/// names it by id): retyping one is refused, to drop the empty table.
fn replacement_of_empty(
    table: &str,
    metadata: &TableMetadata,
    result: &Schema,
) -> Result<SchemaChange> {
    let current = metadata.current_schema();
    let partitioning: Vec<i32> = metadata
        .partition_specs_iter()
        .flat_map(|spec| spec.fields().iter().map(|f| f.source_id))
        .collect();
    let mut next_id = metadata.last_column_id();
    let mut fields: Vec<NestedFieldRef> = Vec::new();
    let mut changes =
        vec!["the table has no snapshot yet: its schema is replaced by the result's".to_string()];
    for column in result.as_struct().fields() {
        let name = column.name.as_str();
        let theirs = column.field_type.as_ref();
        match current.field_by_name(name) {
            Some(ours) if same_shape(&ours.field_type, theirs) => fields.push(ours.clone()),
            Some(ours) if widens(&ours.field_type, theirs) => {
                fields.push(Arc::new(NestedField::optional(
                    ours.id,
                    name,
                    theirs.clone(),
                )));
                changes.push(format!("widened {name}: {} -> {theirs}", ours.field_type));
            }
            Some(ours) if partitioning.contains(&ours.id) => {
                return Err(CoreError::Target {
                    table: table.to_string(),
                    message: format!(
                        "its column `{name}` partitions it and cannot change from {} to {theirs}{}",
                        ours.field_type,
                        super::layout::NO_SNAPSHOT_YET
                    ),
                });
            }
            ours => {
                let column = new_column(name, theirs, &mut next_id);
                let ty = &column.field_type;
                changes.push(match ours {
                    Some(ours) => format!("retyped {name}: {} -> {ty}", ours.field_type),
                    None => format!("added {name}: {ty}"),
                });
                fields.push(column);
            }
        }
    }
    for column in current.as_struct().fields() {
        if result.field_by_name(&column.name).is_none() {
            changes.push(format!("dropped {}: {}", column.name, column.field_type));
        }
    }
    let kept: Vec<i32> = current
        .identifier_field_ids()
        .filter(|id| fields.iter().any(|f| f.id == *id))
        .collect();
    let schema = Schema::builder()
        .with_schema_id(current.schema_id())
        .with_fields(fields)
        .with_identifier_field_ids(kept)
        .build()
        .map_err(|e| CoreError::Target {
            table: table.to_string(),
            message: format!("cannot replace the schema of the table, which has no snapshot: {e}"),
        })?;
    Ok(SchemaChange {
        base_schema_id: current.schema_id(),
        base_last_column_id: metadata.last_column_id(),
        schema,
        changes,
        replaces_empty: true,
    })
}

/// The columns whose values are partition values in some partition spec of the table
/// (identity and truncate keep the column's type): widening one (`int` to `long`) left
/// files whose partition values keep the narrow type, which iceberg-rust 0.10 cannot write
/// again under the wide one, and an `overwrite_partitions` kept their rows beside the new.
fn columns_holding_partition_values(metadata: &TableMetadata) -> Vec<i32> {
    use iceberg::spec::Transform;
    metadata
        .partition_specs_iter()
        .flat_map(|spec| spec.fields().iter())
        .filter(|f| matches!(f.transform, Transform::Identity | Transform::Truncate(_)))
        .map(|f| f.source_id)
        .collect()
}

fn fit_existing(ours: &Type, theirs: &Type, policy: SchemaEvolution) -> Fit {
    if same_shape(ours, theirs) {
        Fit::Same
    } else if widens(theirs, ours) {
        Fit::Converted
    } else if widens(ours, theirs) {
        match policy {
            SchemaEvolution::AddColumns => Fit::Widened(theirs.clone()),
            SchemaEvolution::None => Fit::Refused(format!("a wider type: {NEEDS_EVOLUTION}")),
        }
    } else {
        Fit::Refused(format!(
            "Iceberg cannot change {ours} to {theirs}; CAST it in the SQL"
        ))
    }
}

/// Iceberg's allowed type promotions: int to long, float to double, a decimal to a higher
/// precision at the same scale.
fn widens(from: &Type, to: &Type) -> bool {
    use PrimitiveType as P;
    match (from, to) {
        (Type::Primitive(from), Type::Primitive(to)) => match (from, to) {
            (P::Int, P::Long) | (P::Float, P::Double) => true,
            (
                P::Decimal {
                    precision: p1,
                    scale: s1,
                },
                P::Decimal {
                    precision: p2,
                    scale: s2,
                },
            ) => s1 == s2 && p2 > p1,
            _ => false,
        },
        _ => false,
    }
}

/// Equal types, ignoring the field ids of nested fields (a result's are not the table's).
fn same_shape(a: &Type, b: &Type) -> bool {
    let fields_match = |a: &NestedField, b: &NestedField| {
        a.name == b.name && a.required == b.required && same_shape(&a.field_type, &b.field_type)
    };
    match (a, b) {
        (Type::Primitive(a), Type::Primitive(b)) => a == b,
        (Type::Struct(a), Type::Struct(b)) => {
            a.fields().len() == b.fields().len()
                && a.fields()
                    .iter()
                    .zip(b.fields())
                    .all(|(a, b)| fields_match(a, b))
        }
        (Type::List(a), Type::List(b)) => fields_match(&a.element_field, &b.element_field),
        (Type::Map(a), Type::Map(b)) => {
            fields_match(&a.key_field, &b.key_field) && fields_match(&a.value_field, &b.value_field)
        }
        _ => false,
    }
}

/// A new optional column `name` of `ty`, with a fresh field id and fresh ids for its nested
/// fields, counting on from `next_id`.
fn new_column(name: &str, ty: &Type, next_id: &mut i32) -> NestedFieldRef {
    *next_id += 1;
    let id = *next_id;
    let ty = renumbered(ty, next_id);
    Arc::new(NestedField::optional(id, name, ty))
}

/// `ty` with fresh field ids for its nested fields, counting on from `next_id`.
fn renumbered(ty: &Type, next_id: &mut i32) -> Type {
    let mut field = |f: &NestedFieldRef| -> NestedFieldRef {
        *next_id += 1;
        let mut copy = f.as_ref().clone();
        copy.id = *next_id;
        copy.field_type = Box::new(renumbered(&f.field_type, next_id));
        Arc::new(copy)
    };
    match ty {
        Type::Primitive(_) => ty.clone(),
        Type::Struct(s) => Type::Struct(StructType::new(s.fields().iter().map(field).collect())),
        Type::List(l) => Type::List(ListType {
            element_field: field(&l.element_field),
        }),
        Type::Map(m) => Type::Map(MapType {
            key_field: field(&m.key_field),
            value_field: field(&m.value_field),
        }),
    }
}

fn side_by_side(
    fits: &[(&str, Option<&Type>, Option<&Type>, Fit)],
    policy: SchemaEvolution,
) -> String {
    let shown = |t: Option<&Type>| t.map_or("-".to_string(), |t| t.to_string());
    let rows: Vec<[String; 4]> = fits
        .iter()
        .map(|(name, ours, theirs, fit)| {
            let note = match fit {
                Fit::Same => String::new(),
                Fit::Converted => "written converted".into(),
                Fit::Widened(_) => "widened".into(),
                Fit::Added => "added".into(),
                Fit::Refused(why) => format!("REFUSED: {why}"),
            };
            [name.to_string(), shown(*ours), shown(*theirs), note]
        })
        .collect();
    let header = ["column", "table", "result", ""].map(String::from);
    let widths: Vec<usize> = (0..3)
        .map(|i| {
            rows.iter()
                .chain([&header])
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out =
        format!("the result does not fit the table's schema (schema_evolution = \"{policy}\"):");
    for row in std::iter::once(&header).chain(&rows) {
        let _ = write!(
            out,
            "\n  {:<w0$}  {:<w1$}  {:<w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        out.truncate(out.trim_end().len());
    }
    out
}

/// Why the files of a table whose schema evolved cannot be read by column name, the way
/// sources are read: a column renamed since an older schema (files written before hold it
/// under its old name, and would read as NULL), or a current name an older schema gave to
/// another field (files written before hold another column under it). `None` when every
/// schema the table has had agrees with the current one on the fields they share; added,
/// dropped, widened and reordered columns read correctly by name.
pub fn unreadable_by_name(metadata: &TableMetadata) -> Option<String> {
    let current = metadata.current_schema();
    let now = current.field_id_to_name_map();
    let mut problems: Vec<String> = Vec::new();
    for older in metadata.schemas_iter() {
        if older.schema_id() == current.schema_id() {
            continue;
        }
        for (id, then) in older.field_id_to_name_map() {
            match now.get(id) {
                Some(name) if name != then => {
                    problems.push(format!("`{then}` was renamed `{name}`"))
                }
                None if current.field_by_name(then).is_some() => problems.push(format!(
                    "`{then}` was dropped and a new column took its name"
                )),
                _ => {}
            }
        }
    }
    problems.sort();
    problems.dedup();
    (!problems.is_empty()).then(|| {
        format!(
            "its schema changed in a way a read by column name gets wrong ({}): files written before would read those columns as NULL or as another column",
            problems.join(", ")
        )
    })
}

/// Catalog updates, and the requirements they land on.
pub type SchemaStep = (Vec<TableUpdate>, Vec<TableRequirement>);

/// The catalog updates and requirements that make `change.schema` the table's current schema
/// in the commit that adds the job's snapshot; none when `metadata` already has it as its
/// current schema (another run made the same change). An error when the table's schema
/// changed otherwise since the job planned: its files were written for the old one.
pub fn schema_updates(
    metadata: &TableMetadata,
    change: &SchemaChange,
) -> std::result::Result<Option<SchemaStep>, String> {
    if same_schema(metadata.current_schema(), &change.schema) {
        return Ok(None);
    }
    if change.replaces_empty && metadata.snapshots().len() > 0 {
        return Err(
            "another run committed to the table while this one replaced its schema (the table had no snapshot when the job planned): run the job again"
                .into(),
        );
    }
    if metadata.current_schema_id() != change.base_schema_id
        || metadata.last_column_id() != change.base_last_column_id
    {
        return Err(format!(
            "the table's schema changed while the job ran (it planned on schema {}, the table is now at schema {}): run the job again",
            change.base_schema_id,
            metadata.current_schema_id()
        ));
    }
    Ok(Some((
        vec![
            TableUpdate::AddSchema {
                schema: change.schema.clone(),
            },
            TableUpdate::SetCurrentSchema { schema_id: -1 },
        ],
        vec![
            TableRequirement::CurrentSchemaIdMatch {
                current_schema_id: change.base_schema_id,
            },
            TableRequirement::LastAssignedFieldIdMatch {
                last_assigned_field_id: change.base_last_column_id,
            },
        ]
        .into_iter()
        // A replaced schema may retype and drop columns: it must land before any rows do.
        .chain(
            change
                .replaces_empty
                .then(|| TableRequirement::RefSnapshotIdMatch {
                    r#ref: iceberg::spec::MAIN_BRANCH.to_string(),
                    snapshot_id: None,
                }),
        )
        .collect(),
    )))
}

/// The same columns and identifier fields, whatever the schema ids (iceberg's own check is
/// crate-private).
fn same_schema(a: &Schema, b: &Schema) -> bool {
    a.as_struct() == b.as_struct() && a.identifier_field_ids().eq(b.identifier_field_ids())
}

/// `table` as it will be once `updates` land: what a snapshot built on it must see (its
/// current schema, in particular).
pub fn with_updates_applied(table: &Table, updates: &[TableUpdate]) -> Result<Table> {
    let mut builder = table.metadata().clone().into_builder(None);
    for update in updates {
        builder = update.clone().apply(builder)?;
    }
    let mut next = Table::builder()
        .metadata(builder.build()?.metadata)
        .identifier(table.identifier().clone())
        .file_io(table.file_io().clone())
        .runtime(iceberg::Runtime::try_current()?);
    if let Some(location) = table.metadata_location() {
        next = next.metadata_location(location);
    }
    Ok(next.build()?)
}

#[cfg(test)]
mod tests {
    use iceberg::spec::{FormatVersion, TableMetadataBuilder, UnboundPartitionSpec};

    use super::*;

    fn schema(fields: &[(i32, &str, PrimitiveType)]) -> Schema {
        Schema::builder()
            .with_fields(
                fields
                    .iter()
                    .map(|(id, name, ty)| {
                        Arc::new(NestedField::optional(
                            *id,
                            *name,
                            Type::Primitive(ty.clone()),
                        ))
                    })
                    .collect::<Vec<_>>(),
            )
            .build()
            .unwrap()
    }

    /// An unpartitioned table with `table`'s columns and a snapshot.
    fn metadata(table: Schema) -> TableMetadata {
        partitioned(table, UnboundPartitionSpec::builder().build())
    }

    /// A table partitioned by `spec` with a snapshot.
    fn partitioned(table: Schema, spec: UnboundPartitionSpec) -> TableMetadata {
        with_a_snapshot(never_committed(table, spec))
    }

    /// A table created and never committed to.
    fn never_committed(table: Schema, spec: UnboundPartitionSpec) -> TableMetadata {
        TableMetadataBuilder::new(
            table,
            spec,
            iceberg::spec::SortOrder::unsorted_order(),
            "memory:///t".into(),
            FormatVersion::V2,
            Default::default(),
        )
        .unwrap()
        .build()
        .unwrap()
        .metadata
    }

    fn with_a_snapshot(metadata: TableMetadata) -> TableMetadata {
        let snapshot = iceberg::spec::Snapshot::builder()
            .with_snapshot_id(1)
            .with_sequence_number(1)
            .with_timestamp_ms(metadata.last_updated_ms() + 1)
            .with_manifest_list("memory:///t/metadata/snap-1.avro")
            .with_summary(iceberg::spec::Summary {
                operation: iceberg::spec::Operation::Append,
                additional_properties: Default::default(),
            })
            .with_schema_id(metadata.current_schema_id())
            .build();
        metadata
            .into_builder(None)
            .set_branch_snapshot(snapshot, iceberg::spec::MAIN_BRANCH)
            .unwrap()
            .build()
            .unwrap()
            .metadata
    }

    fn columns(change: &SchemaChange) -> Vec<(i32, String, String)> {
        change
            .schema
            .as_struct()
            .fields()
            .iter()
            .map(|f| (f.id, f.name.clone(), f.field_type.to_string()))
            .collect()
    }

    /// A first run that stopped after creating the table left it with no snapshot and its
    /// code's schema: the fixed spec's result replaces it (widened, retyped, renamed,
    /// dropped), where a table holding rows refuses the same result. A retyped column gets a
    /// fresh id, so a file of the old schema committed later reads it as absent, not as
    /// another type; a partition column cannot take one. The replacement lands only on a
    /// table that still has no snapshot.
    #[test]
    fn a_table_with_no_snapshot_takes_the_results_schema() {
        let spec = UnboundPartitionSpec::builder()
            .add_partition_field(1, "day", iceberg::spec::Transform::Identity)
            .unwrap()
            .build();
        let table_columns = || {
            schema(&[
                (1, "day", PrimitiveType::String),
                (2, "amount", decimal(10, 2)),
                (3, "old_name", PrimitiveType::Int),
                (4, "qty", PrimitiveType::Int),
            ])
        };
        let result = schema(&[
            (1, "day", PrimitiveType::String),
            (2, "amount", decimal(12, 2)),
            (3, "new_name", PrimitiveType::Long),
            (4, "qty", PrimitiveType::String),
        ]);
        let empty = never_committed(table_columns(), spec.clone());
        for policy in [SchemaEvolution::None, SchemaEvolution::AddColumns] {
            let change = plan_schema_change("ns.t", &empty, &result, policy)
                .unwrap()
                .expect("a replacement");
            assert!(change.replaces_empty);
            assert_eq!(
                columns(&change),
                [
                    (1, "day".into(), "string".into()),
                    (2, "amount".into(), "decimal(12, 2)".into()),
                    (5, "new_name".into(), "long".into()),
                    (6, "qty".into(), "string".into()),
                ]
            );
            assert_eq!(
                change.changes,
                [
                    "the table has no snapshot yet: its schema is replaced by the result's",
                    "widened amount: decimal(10, 2) -> decimal(12, 2)",
                    "added new_name: long",
                    "retyped qty: int -> string",
                    "dropped old_name: int",
                ]
            );
            let (updates, requirements) =
                schema_updates(&empty, &change).unwrap().expect("updates");
            assert_eq!(updates.len(), 2);
            assert!(
                requirements.contains(&TableRequirement::RefSnapshotIdMatch {
                    r#ref: "main".into(),
                    snapshot_id: None,
                })
            );
            // Another run committed meanwhile: the replacement must not land on its rows.
            let err = schema_updates(&with_a_snapshot(empty.clone()), &change).unwrap_err();
            assert!(err.contains("another run committed to the table"), "{err}");
        }
        let retyped_partition = schema(&[
            (1, "day", PrimitiveType::Date),
            (2, "amount", decimal(10, 2)),
        ]);
        let err = plan_schema_change("ns.t", &empty, &retyped_partition, SchemaEvolution::None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("column `day` partitions it and cannot change from string to date"),
            "{err}"
        );
        let holding_rows = partitioned(table_columns(), spec);
        let err = plan_schema_change("ns.t", &holding_rows, &result, SchemaEvolution::None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("REFUSED"), "{err}");
        // A result that fits an empty table as it is changes nothing.
        let fits = schema(&[
            (1, "day", PrimitiveType::String),
            (2, "amount", decimal(10, 2)),
            (3, "old_name", PrimitiveType::Int),
            (4, "qty", PrimitiveType::Int),
        ]);
        assert_eq!(
            plan_schema_change("ns.t", &empty, &fits, SchemaEvolution::None).unwrap(),
            None
        );
    }

    fn decimal(precision: u32, scale: u32) -> PrimitiveType {
        PrimitiveType::Decimal { precision, scale }
    }

    #[test]
    fn the_same_columns_or_narrower_ones_change_nothing() {
        let table = metadata(schema(&[
            (1, "id", PrimitiveType::Long),
            (2, "x", PrimitiveType::Double),
        ]));
        let result = schema(&[
            (1, "x", PrimitiveType::Float),
            (2, "id", PrimitiveType::Int),
        ]);
        for policy in [SchemaEvolution::None, SchemaEvolution::AddColumns] {
            assert_eq!(
                plan_schema_change("ns.t", &table, &result, policy).unwrap(),
                None
            );
        }
    }

    #[test]
    fn add_columns_adds_with_fresh_ids_and_widens_in_place() {
        let table = metadata(schema(&[
            (1, "id", PrimitiveType::Int),
            (2, "amount", decimal(10, 2)),
        ]));
        let result = schema(&[
            (1, "id", PrimitiveType::Long),
            (2, "note", PrimitiveType::String),
            (3, "amount", decimal(12, 2)),
        ]);
        let change = plan_schema_change("ns.t", &table, &result, SchemaEvolution::AddColumns)
            .unwrap()
            .expect("a change");
        let fields: Vec<(i32, String, String)> = change
            .schema
            .as_struct()
            .fields()
            .iter()
            .map(|f| (f.id, f.name.clone(), f.field_type.to_string()))
            .collect();
        assert_eq!(
            fields,
            [
                (1, "id".into(), "long".into()),
                (2, "amount".into(), "decimal(12, 2)".into()),
                (3, "note".into(), "string".into()),
            ]
        );
        assert_eq!(change.base_last_column_id, 2);
        assert_eq!(
            change.changes,
            [
                "widened id: int -> long",
                "widened amount: decimal(10, 2) -> decimal(12, 2)",
                "added note: string"
            ]
        );
    }

    #[test]
    fn a_column_holding_partition_values_is_not_widened_but_a_decimal_is() {
        let columns = schema(&[
            (1, "n", PrimitiveType::Int),
            (2, "f", PrimitiveType::Float),
            (3, "d", decimal(10, 2)),
            (4, "b", PrimitiveType::Int),
        ]);
        let spec = UnboundPartitionSpec::builder()
            .add_partition_field(1, "n", iceberg::spec::Transform::Identity)
            .unwrap()
            .add_partition_field(2, "f", iceberg::spec::Transform::Identity)
            .unwrap()
            .add_partition_field(3, "d", iceberg::spec::Transform::Identity)
            .unwrap()
            .add_partition_field(4, "b_bucket", iceberg::spec::Transform::Bucket(4))
            .unwrap()
            .build();
        let table = partitioned(columns, spec);
        let widen = |n, f| {
            let result = schema(&[
                (1, "n", n),
                (2, "f", f),
                (3, "d", decimal(12, 2)),
                (4, "b", PrimitiveType::Long),
            ]);
            plan_schema_change("ns.t", &table, &result, SchemaEvolution::AddColumns)
        };
        for (n, f, refused) in [
            (PrimitiveType::Long, PrimitiveType::Float, "n "),
            (PrimitiveType::Int, PrimitiveType::Double, "f "),
        ] {
            let err = widen(n, f).unwrap_err().to_string();
            assert!(
                err.contains("its values are partition values") && err.contains(refused),
                "{err}"
            );
        }
        // The decimal's partition values keep their meaning; a bucket's are ints anyway.
        let change = widen(PrimitiveType::Int, PrimitiveType::Float)
            .unwrap()
            .expect("a change");
        assert_eq!(
            change.changes,
            [
                "widened d: decimal(10, 2) -> decimal(12, 2)",
                "widened b: int -> long"
            ]
        );
    }

    #[test]
    fn refusals_show_both_schemas_with_the_reason() {
        let table = metadata(schema(&[
            (1, "id", PrimitiveType::Int),
            (2, "price", PrimitiveType::Double),
            (3, "gone", PrimitiveType::String),
        ]));
        let result = schema(&[
            (1, "id", PrimitiveType::Long),
            (2, "price", PrimitiveType::String),
            (3, "ünïcode", PrimitiveType::Date),
        ]);
        let err = plan_schema_change("ns.t", &table, &result, SchemaEvolution::None)
            .unwrap_err()
            .to_string();
        let expected = "target `ns.t`: the result does not fit the table's schema (schema_evolution = \"none\"):
  column   table   result
  id       int     long    REFUSED: a wider type: needs schema_evolution = \"add_columns\"
  price    double  string  REFUSED: Iceberg cannot change double to string; CAST it in the SQL
  gone     string  -       REFUSED: the result lacks this column
  ünïcode  -       date    REFUSED: a new column: needs schema_evolution = \"add_columns\"";
        assert_eq!(err, expected);
        let err = plan_schema_change("ns.t", &table, &result, SchemaEvolution::AddColumns)
            .unwrap_err()
            .to_string();
        assert!(err.contains("price    double  string  REFUSED"), "{err}");
        assert!(err.contains("id       int     long    widened"), "{err}");
        assert!(!err.contains("ünïcode  -       date    REFUSED"), "{err}");
    }

    #[test]
    fn narrowing_a_decimal_scale_or_a_long_is_refused() {
        assert!(!widens(
            &Type::Primitive(decimal(10, 2)),
            &Type::Primitive(decimal(12, 3))
        ));
        assert!(!widens(
            &Type::Primitive(PrimitiveType::Long),
            &Type::Primitive(PrimitiveType::Int)
        ));
        assert!(!widens(
            &Type::Primitive(PrimitiveType::Int),
            &Type::Primitive(PrimitiveType::Double)
        ));
    }

    #[test]
    fn an_added_struct_gets_ids_after_the_last_column() {
        let table = metadata(schema(&[(1, "id", PrimitiveType::Long)]));
        let inner = StructType::new(vec![
            Arc::new(NestedField::optional(
                1,
                "a",
                Type::Primitive(PrimitiveType::Int),
            )),
            Arc::new(NestedField::optional(
                2,
                "b",
                Type::Primitive(PrimitiveType::String),
            )),
        ]);
        let result = Schema::builder()
            .with_fields(vec![
                Arc::new(NestedField::optional(
                    3,
                    "id",
                    Type::Primitive(PrimitiveType::Long),
                )),
                Arc::new(NestedField::optional(4, "s", Type::Struct(inner))),
            ])
            .build()
            .unwrap();
        let change = plan_schema_change("ns.t", &table, &result, SchemaEvolution::AddColumns)
            .unwrap()
            .unwrap();
        let ids: Vec<i32> = change
            .schema
            .field_id_to_name_map()
            .keys()
            .copied()
            .collect();
        let mut ids = ids;
        ids.sort();
        assert_eq!(ids, [1, 2, 3, 4]);
        assert_eq!(change.schema.highest_field_id(), 4);
    }

    #[test]
    fn renamed_or_reused_names_are_unreadable_and_the_rest_reads() {
        let apply = |metadata: &TableMetadata, fields: &[(i32, &str, PrimitiveType)]| {
            // The builder gives it the next schema id.
            let builder = metadata
                .clone()
                .into_builder(None)
                .add_current_schema(schema(fields))
                .unwrap();
            builder.build().unwrap().metadata
        };
        let start = metadata(schema(&[
            (1, "id", PrimitiveType::Int),
            (2, "name", PrimitiveType::String),
        ]));
        // Added, widened, dropped: all read by name.
        let fine = apply(
            &start,
            &[
                (1, "id", PrimitiveType::Long),
                (3, "age", PrimitiveType::Int),
            ],
        );
        assert_eq!(unreadable_by_name(&fine), None);
        let renamed = apply(
            &start,
            &[
                (1, "id", PrimitiveType::Int),
                (2, "full_name", PrimitiveType::String),
            ],
        );
        let why = unreadable_by_name(&renamed).unwrap();
        assert!(why.contains("`name` was renamed `full_name`"), "{why}");
        let reused = apply(
            &start,
            &[
                (1, "id", PrimitiveType::Int),
                (3, "name", PrimitiveType::String),
            ],
        );
        let why = unreadable_by_name(&reused).unwrap();
        assert!(
            why.contains("`name` was dropped and a new column took its name"),
            "{why}"
        );
    }

    #[test]
    fn the_commit_adds_the_schema_once_and_refuses_a_schema_changed_meanwhile() {
        let table = metadata(schema(&[(1, "id", PrimitiveType::Long)]));
        let result = schema(&[(1, "id", PrimitiveType::Long), (2, "n", PrimitiveType::Int)]);
        let change = plan_schema_change("ns.t", &table, &result, SchemaEvolution::AddColumns)
            .unwrap()
            .unwrap();
        let (updates, requirements) = schema_updates(&table, &change).unwrap().unwrap();
        assert_eq!(updates.len(), 2);
        assert!(requirements.iter().all(|r| r.check(Some(&table)).is_ok()));
        // Once applied, the same change needs nothing more.
        let mut builder = table.clone().into_builder(None);
        for update in &updates {
            builder = update.clone().apply(builder).unwrap();
        }
        let evolved = builder.build().unwrap().metadata;
        assert_eq!(evolved.current_schema().highest_field_id(), 2);
        assert_eq!(schema_updates(&evolved, &change).unwrap(), None);
        // Another change in between: the files were written for a schema that is gone.
        let other = schema(&[
            (1, "id", PrimitiveType::Long),
            (2, "m", PrimitiveType::String),
        ]);
        let other = plan_schema_change("ns.t", &table, &other, SchemaEvolution::AddColumns)
            .unwrap()
            .unwrap();
        let mut builder = table.clone().into_builder(None);
        for update in schema_updates(&table, &other).unwrap().unwrap().0 {
            builder = update.apply(builder).unwrap();
        }
        let moved = builder.build().unwrap().metadata;
        let err = schema_updates(&moved, &change).unwrap_err();
        assert!(err.contains("changed while the job ran"), "{err}");
    }
}
