//! The target table's layout: created from the result schema and the spec's partition
//! fields, or checked against an existing table.

use std::collections::HashMap;

use datafusion::arrow::datatypes::Schema as ArrowSchema;
use iceberg::spec::{Transform, UnboundPartitionSpec};
use iceberg::table::Table;
use iceberg::{Catalog, TableCreation, TableIdent};
use nightshift_spec::{PartitionField, PartitionTransform, SchemaEvolution};

use super::evolution::{SchemaChange, plan_schema_change};
use super::schema::iceberg_schema_for;
use crate::error::{CoreError, Result};

/// Loads the target table, or creates it (and its namespace) from the result schema and the
/// spec's partition fields. An existing table must accept the result's columns.
pub async fn ensure_table(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    result_schema: &ArrowSchema,
    partition_by: &[PartitionField],
    properties: &HashMap<String, String>,
) -> Result<Table> {
    let layout = TargetLayout {
        result_schema,
        partition_by,
        evolution: SchemaEvolution::None,
    };
    Ok(ensure_target(catalog, ident, &layout, properties).await?.0)
}

/// What the job's result asks of its target table.
#[derive(Debug, Clone, Copy)]
pub struct TargetLayout<'a> {
    pub result_schema: &'a ArrowSchema,
    pub partition_by: &'a [PartitionField],
    pub evolution: SchemaEvolution,
}

/// [`ensure_table`], with the schema change an existing table needs for the result when the
/// spec's `schema_evolution` allows one (committed later, with the job's snapshot).
pub async fn ensure_target(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    layout: &TargetLayout<'_>,
    properties: &HashMap<String, String>,
) -> Result<(Table, Option<SchemaChange>)> {
    let name = ident.to_string();
    let TargetLayout {
        result_schema,
        partition_by,
        ..
    } = *layout;
    if catalog.table_exists(ident).await? {
        return load_compatible(catalog, ident, layout).await;
    }
    let (wanted, spec) = target_layout(&name, result_schema, partition_by)?;
    let namespace = ident.namespace();
    if !catalog.namespace_exists(namespace).await? {
        match catalog.create_namespace(namespace, HashMap::new()).await {
            Ok(_) => {}
            // Another job created it first (the SQL catalog reports that race as a
            // unique-constraint error, not as "already exists").
            Err(e) if e.kind() == iceberg::ErrorKind::NamespaceAlreadyExists => {}
            Err(e) if catalog.namespace_exists(namespace).await.unwrap_or(false) => {
                tracing::debug!(error = %e, "namespace created by another job meanwhile");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let creation = TableCreation::builder()
        .name(ident.name().to_string())
        .schema(wanted)
        .partition_spec(spec)
        .properties(properties.clone())
        .build();
    match catalog.create_table(namespace, creation).await {
        Ok(table) => Ok((table, None)),
        // Another job created it first: catalogs say so differently (REST: already exists;
        // SQL: a unique-constraint error), so look rather than read the error.
        Err(e) => match catalog.table_exists(ident).await {
            Ok(true) => load_compatible(catalog, ident, layout).await,
            _ => Err(e.into()),
        },
    }
}

/// The existing table `ident`, checked against the result's layout, with the schema change
/// the result needs.
async fn load_compatible(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    layout: &TargetLayout<'_>,
) -> Result<(Table, Option<SchemaChange>)> {
    let name = ident.to_string();
    let table = catalog.load_table(ident).await?;
    let result_schema = with_table_types_for_nulls(&table, layout.result_schema)?;
    let (wanted, _) = target_layout(&name, &result_schema, layout.partition_by)?;
    let change = check_compatible(
        &name,
        &table,
        &wanted,
        layout.partition_by,
        layout.evolution,
    )?;
    Ok((table, change))
}

/// A result column of type Null (e.g. from a header-only CSV) takes the type of the table's
/// column of that name: NULL fits any column.
pub fn with_table_types_for_nulls(table: &Table, result: &ArrowSchema) -> Result<ArrowSchema> {
    let table_arrow = iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema())?;
    let fields = result
        .fields()
        .iter()
        .map(
            |f| match (f.data_type(), table_arrow.field_with_name(f.name())) {
                (datafusion::arrow::datatypes::DataType::Null, Ok(existing)) => {
                    std::sync::Arc::new(datafusion::arrow::datatypes::Field::new(
                        f.name(),
                        existing.data_type().clone(),
                        true,
                    ))
                }
                _ => f.clone(),
            },
        )
        .collect::<Vec<_>>();
    Ok(ArrowSchema::new(fields))
}

/// The schema and partition spec a table created from `result_schema` gets. Binding the spec
/// now turns a transform that does not fit its column into a clear error. A result without
/// columns (`SELECT *` of an empty, 0-byte CSV file) has nothing a table could hold: creating
/// one would leave a table no later run fits.
pub fn target_layout(
    name: &str,
    result_schema: &ArrowSchema,
    partition_by: &[PartitionField],
) -> Result<(iceberg::spec::Schema, UnboundPartitionSpec)> {
    if result_schema.fields().is_empty() {
        return Err(CoreError::Target {
            table: name.to_string(),
            message: "the result has no columns (a source read from empty files has none: \
                      declare its columns in [source.schema], or select named columns)"
                .to_string(),
        });
    }
    if let Some((a, b)) = names_differing_only_in_case(result_schema) {
        let message = if a == b {
            format!(
                "the result has two columns named `{a}` (from two tables, as `SELECT x.{a}, y.{a}` gives): give one an alias in the SQL (`y.{a} AS other_{a}`)"
            )
        } else {
            format!(
                "the result's columns `{a}` and `{b}` differ only in case: readers that ignore case (Spark, Trino, DuckDB) would see two columns of one name; rename one in the SQL"
            )
        };
        return Err(CoreError::Target {
            table: name.to_string(),
            message,
        });
    }
    let schema = iceberg_schema_for(name, result_schema)?;
    let spec = unbound_partition_spec(name, &schema, partition_by)?;
    spec.clone()
        .bind(std::sync::Arc::new(schema.clone()))
        .map_err(|e| CoreError::Target {
            table: name.to_string(),
            message: format!(
                "partition_by does not fit the result columns: {}",
                e.message()
            ),
        })?;
    Ok((schema, spec))
}

/// The first two columns of `schema` whose names are equal but for case (`amount`,
/// `Amount`).
fn names_differing_only_in_case(schema: &ArrowSchema) -> Option<(&str, &str)> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for field in schema.fields() {
        let name = field.name().as_str();
        if let Some(first) = seen.insert(name.to_lowercase(), name) {
            return Some((first, name));
        }
    }
    None
}

fn unbound_partition_spec(
    table: &str,
    schema: &iceberg::spec::Schema,
    partition_by: &[PartitionField],
) -> Result<UnboundPartitionSpec> {
    let mut builder = UnboundPartitionSpec::builder();
    for field in partition_by {
        let source = schema.field_by_name(&field.column).ok_or_else(|| {
            let columns: Vec<_> = schema.as_struct().fields().iter().map(|f| f.name.as_str()).collect();
            CoreError::Target {
                table: table.to_string(),
                message: format!(
                    "partition_by names column `{}` which the result does not have; result columns: {}",
                    field.column,
                    columns.join(", ")
                ),
            }
        })?;
        builder = builder.add_partition_field(
            source.id,
            field.field_name(),
            to_iceberg(field.transform),
        )?;
    }
    Ok(builder.build())
}

fn to_iceberg(t: PartitionTransform) -> Transform {
    match t {
        PartitionTransform::Identity => Transform::Identity,
        PartitionTransform::Year => Transform::Year,
        PartitionTransform::Month => Transform::Month,
        PartitionTransform::Day => Transform::Day,
        PartitionTransform::Hour => Transform::Hour,
        PartitionTransform::Bucket(n) => Transform::Bucket(n),
        PartitionTransform::Truncate(w) => Transform::Truncate(w),
    }
}

/// The spec transform `t` is, if a job can write it (not `void` or an unknown one).
pub(crate) fn from_iceberg(t: Transform) -> Option<PartitionTransform> {
    Some(match t {
        Transform::Identity => PartitionTransform::Identity,
        Transform::Year => PartitionTransform::Year,
        Transform::Month => PartitionTransform::Month,
        Transform::Day => PartitionTransform::Day,
        Transform::Hour => PartitionTransform::Hour,
        Transform::Bucket(n) => PartitionTransform::Bucket(n),
        Transform::Truncate(w) => PartitionTransform::Truncate(w),
        _ => return None,
    })
}

/// Said of a table with no snapshot that a run cannot change as it asks: how to get past it.
pub(super) const NO_SNAPSHOT_YET: &str = "; the table has no snapshot yet (a first run that stopped before its commit created it): drop it (PyIceberg: `catalog.drop_table`) and run again";

/// An existing table must have the partitioning the spec asks for, and every result column
/// with a type it can hold, unless `evolution` allows the schema change the result needs
/// (returned).
pub fn check_compatible(
    name: &str,
    table: &Table,
    wanted: &iceberg::spec::Schema,
    partition_by: &[PartitionField],
    evolution: SchemaEvolution,
) -> Result<Option<SchemaChange>> {
    let current = table.metadata().current_schema();
    let target_err = |message: String| CoreError::Target {
        table: name.to_string(),
        message,
    };
    let change = plan_schema_change(name, table.metadata(), wanted, evolution)?;
    let spec = table.metadata().default_partition_spec();
    let existing: Vec<(String, Transform)> = spec
        .fields()
        .iter()
        .map(|f| {
            let column = current
                .name_by_field_id(f.source_id)
                .unwrap_or_default()
                .to_string();
            (column, f.transform)
        })
        .collect();
    let requested: Vec<(String, Transform)> = partition_by
        .iter()
        .map(|f| (f.column.clone(), to_iceberg(f.transform)))
        .collect();
    if existing != requested {
        // Its schema would be replaced (`plan_schema_change`); its partitioning is not.
        let empty = if table.metadata().snapshots().len() == 0 {
            NO_SNAPSHOT_YET
        } else {
            ""
        };
        return Err(target_err(format!(
            "the table is partitioned by {} but the spec asks for {}{empty}",
            describe_partitioning(&existing),
            describe_partitioning(&requested)
        )));
    }
    Ok(change)
}

fn describe_partitioning(fields: &[(String, Transform)]) -> String {
    if fields.is_empty() {
        return "nothing (unpartitioned)".into();
    }
    fields
        .iter()
        .map(|(c, t)| format!("{t}({c})"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_without_columns_makes_no_table() {
        let err = target_layout("t.empty", &ArrowSchema::empty(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.empty") && err.contains("no columns"),
            "{err}"
        );
    }

    /// A table of `amount` and `Amount` is two columns to Iceberg and one name to readers
    /// that ignore case; it was created, and `add_columns` added the second.
    #[test]
    fn result_columns_differing_only_in_case_make_no_table() {
        use datafusion::arrow::datatypes::{DataType, Field};
        let schema = |names: &[&str]| {
            ArrowSchema::new(
                names
                    .iter()
                    .map(|n| Field::new(*n, DataType::Int64, true))
                    .collect::<Vec<_>>(),
            )
        };
        let err = target_layout(
            "t.cased",
            &schema(&["id", "amount", "Ämount", "AMOUNT"]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`amount` and `AMOUNT` differ only in case"),
            "{err}"
        );
        assert!(target_layout("t.cased", &schema(&["id", "amount", "Ämount"]), &[]).is_ok());
        // The same name twice (a join's `SELECT a.id, b.id`) is not a matter of case.
        let err = target_layout("t.joined", &schema(&["id", "v", "id"]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the result has two columns named `id`") && !err.contains("case"),
            "{err}"
        );
    }
}
