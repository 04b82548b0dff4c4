//! Registers a spec's `[[source]]` tables in a DataFusion session and checks their schema
//! contracts before any task runs.

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::Session;
use datafusion::datasource::file_format::options::ReadOptions;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{MemTable, TableProvider};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionContext};
use futures::StreamExt;
use iceberg::Catalog;
use nightshift_spec::{ColumnContract, ResolvedSpec, SourceFormat, SourceSpec};
use object_store::ObjectStoreExt;

use crate::error::{CoreError, Result};
use crate::file_inspections::{
    FileVersion, Inspection, inspection_key, local_tag, remember, remembered,
};
use crate::not_null::{NotNullCheck, NotNullCheckExec};
use crate::storage::{Location, list_objects_meta};

/// What was found for one source.
#[derive(Debug, Clone)]
pub struct SourceSummary {
    pub name: String,
    pub format: SourceFormat,
    /// Where it was read from, as the user would recognise it.
    pub location: String,
    pub files: usize,
    pub bytes: u64,
    pub schema: SchemaRef,
    /// For an Iceberg source: the snapshot read (`None` for a table with no snapshot yet).
    pub snapshot_id: Option<i64>,
    /// For an incremental source: what this job consumes of it once it commits (recorded in
    /// the commit's summary).
    pub consumed: Option<crate::incremental::Consumption>,
    /// For an incremental source: what it read, in words (`appended since snapshot N: ...`).
    pub read: Option<String>,
    /// For an incremental source: nothing was appended since the last run.
    pub nothing_new: bool,
}

/// Whether a job of `sources` has nothing to do: it reads incremental sources, and none has
/// anything new. Its SQL would still give rows (an aggregate's `(0, NULL)`, or what other
/// sources hold), published every night nothing came; a run with nothing new commits
/// nothing.
pub fn nothing_new_upstream(sources: &[SourceSummary]) -> bool {
    let mut incremental = sources.iter().filter(|s| s.consumed.is_some()).peekable();
    incremental.peek().is_some() && incremental.all(|s| s.nothing_new)
}

/// How much of an Iceberg source a job reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IcebergRead<'a> {
    /// Its current snapshot, whole.
    Current,
    /// What was appended since the snapshot this pipeline's last run consumed (`None`: no
    /// run did yet under this table name; then its records of other tables, `(table,
    /// snapshot)`, are looked at in case the table had one of those names before).
    Since(Option<i64>, &'a [(String, i64)]),
    /// These data files of it (and their bytes): the ones a merge rewrites.
    Files(&'a [String], u64),
}

const CSV_OPTIONS: &[&str] = &[
    "header",
    "delimiter",
    "quote",
    "escape",
    "null_value",
    "file_extension",
];
const JSON_OPTIONS: &[&str] = &["file_extension"];
const PARQUET_OPTIONS: &[&str] = &["file_extension"];

/// Registers every source of `spec` in `ctx` as a table named after the source. `catalog`
/// holds the tables of `format = "iceberg"` sources.
pub async fn register_sources(
    ctx: &SessionContext,
    spec: &ResolvedSpec,
    catalog: Option<&dyn Catalog>,
) -> Result<Vec<SourceSummary>> {
    let mut summaries = Vec::with_capacity(spec.spec.source.len());
    let target_history = if spec.spec.source.iter().any(|s| s.incremental) {
        target_history(&spec.spec.target.table, catalog).await?
    } else {
        Vec::new()
    };
    for source in &spec.spec.source {
        let contract = spec
            .contracts
            .get(&source.name)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let summary = match source.format {
            SourceFormat::Iceberg => {
                let other_records: Vec<(String, i64)>;
                let read = if source.incremental {
                    let names = spec.spec.pipeline.names();
                    let table = source.table.as_deref().unwrap_or_default();
                    if let Some(why) = crate::incremental::consumed_under_another_name(
                        &target_history,
                        &names,
                        table,
                    ) {
                        return Err(CoreError::Source {
                            source_name: source.name.clone(),
                            message: why,
                        });
                    }
                    let consumed =
                        crate::incremental::last_consumed(&target_history, &names, table);
                    other_records = match consumed {
                        Some(_) => Vec::new(),
                        None => crate::incremental::records_of_other_tables(
                            &target_history,
                            &names,
                            table,
                        ),
                    };
                    IcebergRead::Since(consumed, &other_records)
                } else {
                    IcebergRead::Current
                };
                register_iceberg(ctx, source, contract, catalog, read).await?
            }
            _ => register_source(ctx, source, contract, &spec.base_dir).await?,
        };
        summaries.push(summary);
    }
    Ok(summaries)
}

/// Registers the current snapshot of `table` (a merge's target) as
/// [`crate::merge::TARGET_VIEW`]. Returns the snapshot id it read, or `None` (nothing
/// registered) when the table does not exist or has no snapshot yet. The id is read before
/// the files, so a commit landing in between can only make the merge's own commit refuse.
pub async fn register_merge_target(
    ctx: &SessionContext,
    table: &str,
    catalog: &dyn Catalog,
    (keys, changes): (&[String], Option<&[crate::merge_files::KeyRange]>),
) -> Result<Option<(i64, std::collections::HashSet<String>)>> {
    let ident = crate::table::parse_table_ident(table)?;
    if !catalog.table_exists(&ident).await? {
        return Ok(None);
    }
    let loaded = catalog.load_table(&ident).await?;
    let Some(base) = loaded.metadata().current_snapshot_id() else {
        return Ok(None);
    };
    // Only the files of the snapshot read that may hold a changed key: the rest stay as
    // they are in the merge's snapshot.
    let (files, bytes, live) = crate::merge_files::files_to_rewrite(&loaded, keys, changes).await?;
    tracing::info!(
        table,
        rewritten = files.len(),
        live,
        "merge rewrites the files that may hold a changed key"
    );
    let paths: Vec<String> = files.iter().cloned().collect();
    let source = iceberg_source(crate::merge::TARGET_VIEW, table);
    ctx.deregister_table(crate::merge::TARGET_VIEW)?;
    ctx.deregister_table(raw_table_name(crate::merge::TARGET_VIEW).as_str())?;
    register_iceberg(
        ctx,
        &source,
        &[],
        Some(catalog),
        IcebergRead::Files(&paths, bytes),
    )
    .await?;
    Ok(Some((base, files)))
}

/// Registers, as `source`'s view, the data files a compaction of `source`'s table (the
/// job's target, `mode = "compact"`) rewrites under `policy`, and returns what it chose.
/// The files are read as any Iceberg source's (by field id after renames, deletes applied).
pub async fn register_compaction_input(
    ctx: &SessionContext,
    source: &SourceSpec,
    catalog: &dyn Catalog,
    policy: crate::table::compact::CompactPolicy,
) -> Result<(SourceSummary, crate::table::compact::CompactionPlan)> {
    let name = source.table.as_deref().unwrap_or_default();
    let ident = crate::table::parse_table_ident(name)?;
    if !catalog.table_exists(&ident).await? {
        return Err(CoreError::Target {
            table: name.to_string(),
            message: "no such table in the catalog: nothing to compact".into(),
        });
    }
    let table = catalog.load_table(&ident).await?;
    let plan = crate::table::compact::plan_compaction(&table, policy).await?;
    let mut paths: Vec<String> = plan.replaced().into_iter().collect();
    paths.sort();
    let read = IcebergRead::Files(&paths, plan.report.bytes_rewritten);
    let summary = register_iceberg(ctx, source, &[], Some(catalog), read).await?;
    Ok((summary, plan))
}

/// A `[[source]]` reading the Iceberg `table` under `name`.
fn iceberg_source(name: &str, table: &str) -> SourceSpec {
    SourceSpec {
        name: name.to_string(),
        format: SourceFormat::Iceberg,
        location: None,
        table: Some(table.to_string()),
        options: Default::default(),
        schema: Default::default(),
        incremental: false,
        on_source_rewrite: Default::default(),
    }
}

/// Registers the current snapshot of the Iceberg `table` as `name` (replacing what was
/// registered under it), for a check that reads another table.
pub async fn register_table_snapshot(
    ctx: &SessionContext,
    name: &str,
    table: &str,
    catalog: Option<&dyn Catalog>,
) -> Result<()> {
    let source = iceberg_source(name, table);
    ctx.deregister_table(name)?;
    ctx.deregister_table(raw_table_name(name).as_str())?;
    register_iceberg(ctx, &source, &[], catalog, IcebergRead::Current).await?;
    Ok(())
}

/// The snapshot summaries of the target's current history, newest first (none for a table
/// that does not exist yet).
async fn target_history(
    table: &str,
    catalog: Option<&dyn Catalog>,
) -> Result<Vec<std::collections::HashMap<String, String>>> {
    let Some(catalog) = catalog else {
        return Ok(Vec::new());
    };
    let ident = crate::table::parse_table_ident(table)?;
    if !catalog.table_exists(&ident).await? {
        return Ok(Vec::new());
    }
    let table = catalog.load_table(&ident).await?;
    Ok(crate::table::commit::history_summaries(&table))
}

/// An Iceberg source is read as the Parquet data files of its current snapshot (or, for an
/// incremental source, of the snapshots appended since the last run), with the table's
/// schema; the files delete files apply to are read with those deletes applied.
async fn register_iceberg(
    ctx: &SessionContext,
    source: &SourceSpec,
    contract: &[ColumnContract],
    catalog: Option<&dyn Catalog>,
    read: IcebergRead<'_>,
) -> Result<SourceSummary> {
    let source_err = |message: String| CoreError::Source {
        source_name: source.name.clone(),
        message,
    };
    let name = source.table.as_deref().unwrap_or_default();
    let catalog = catalog.ok_or_else(|| source_err("iceberg sources need the catalog".into()))?;
    let ident = crate::table::parse_table_ident(name)?;
    if !catalog.table_exists(&ident).await? {
        return Err(source_err(format!(
            "table `{name}` does not exist in the catalog"
        )));
    }
    let table = catalog.load_table(&ident).await?;
    // Files are read by column name; a history with renames is read by field id instead.
    let renamed = crate::table::evolution::unreadable_by_name(table.metadata());
    let arrow_schema = iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema())?;
    let schema = Arc::new(Schema::new(
        arrow_schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), f.data_type().clone(), f.is_nullable()))
            .collect::<Vec<_>>(),
    ));
    let location = Location::parse(table.metadata().location(), Path::new("/"))?;
    check_contract(source, &location, &schema, contract)?;
    // For an incremental source: the snapshot it was consumed up to, under this name or the
    // one the table had before a rename.
    let history = match read {
        IcebergRead::Since(..) => upstream_history(&table),
        IcebergRead::Current | IcebergRead::Files(..) => Vec::new(),
    };
    let since = match read {
        IcebergRead::Current | IcebergRead::Files(..) => None,
        IcebergRead::Since(Some(consumed), _) => Some(Some(consumed)),
        IcebergRead::Since(None, other_records) => Some(
            crate::incremental::record_before_rename(other_records, &history)
                .map(|(old_name, upto)| {
                    tracing::info!(source = %source.name, table = name, old_name = %old_name, upto,
                        "incremental source: read on from the record made under the table's old name");
                    *upto
                }),
        ),
    };
    let range = match since {
        None => crate::incremental::Range::Everything { why: String::new() },
        Some(consumed) => {
            crate::incremental::range_to_read(consumed, &history, source.on_source_rewrite)
                .map_err(|e| source_err(format!("incremental read of `{name}`: {e}")))?
        }
    };
    let upstream = match (&range, read) {
        (_, IcebergRead::Files(files, _)) => current_files(&table, Some(files)).await,
        (crate::incremental::Range::Everything { .. }, _) => current_files(&table, None).await,
        (crate::incremental::Range::Nothing, _) => Ok(UpstreamFiles::default()),
        (crate::incremental::Range::Appended(snapshots), _) => {
            appended_files(&table, snapshots.as_slice()).await
        }
    }
    .map_err(|e| match e {
        UpstreamError::DeletesAppended => source_err(format!(
            "table `{name}`: an appended snapshot added delete files; read it whole with on_source_rewrite = \"full\""
        )),
        UpstreamError::Iceberg(e) => source_err(e.to_string()),
    })?;
    let (paths, bytes) = (upstream.plain.as_slice(), upstream.bytes);
    if let Some(after) = since {
        tracing::info!(source = %source.name, table = name, ?after, ?range, files = paths.len(), bytes, "incremental source");
    }
    let raw_name = raw_table_name(&source.name);
    let plain = match renamed {
        None => parquet_files_table(paths, &schema)?,
        Some(why) => by_field_id(ctx, paths, table.metadata().current_schema(), &schema)
            .await
            .map_err(|e| {
                source_err(format!(
                    "table `{name}`: {why}; reading by field id failed: {e}"
                ))
            })?,
    };
    let files = paths.len() + upstream.with_deletes.len();
    let provider = with_deletes_applied(ctx, plain, &table, &schema, upstream.with_deletes)?;
    ctx.register_table(raw_name.as_str(), provider)?;
    register_view(ctx, source, &raw_name, &schema, contract, &location).await?;
    Ok(SourceSummary {
        name: source.name.clone(),
        format: source.format,
        location: format!("{name} ({location})"),
        files,
        bytes,
        schema,
        snapshot_id: table.metadata().current_snapshot_id(),
        consumed: since.and_then(|after| {
            table
                .metadata()
                .current_snapshot_id()
                .map(|upto| crate::incremental::Consumption {
                    table: name.to_string(),
                    after,
                    upto,
                })
        }),
        read: match (since, &range) {
            (None, _) => None,
            (_, crate::incremental::Range::Everything { why }) => {
                Some(format!("the whole table: {why}"))
            }
            (_, crate::incremental::Range::Nothing) => {
                Some("nothing new since the last run".to_string())
            }
            (_, crate::incremental::Range::Appended(snapshots)) => Some(format!(
                "{} appended snapshot(s) since the last run",
                snapshots.len()
            )),
        },
        nothing_new: since.is_some() && range == crate::incremental::Range::Nothing,
    })
}

/// The table a source's view reads from (the view applies the contract).
fn raw_table_name(source: &str) -> String {
    format!("__nightshift_raw_{source}")
}

/// The Parquet files at `paths` (paths or URLs) as one table of `schema`; an empty table
/// for none.
pub fn parquet_files_table(paths: &[String], schema: &SchemaRef) -> Result<Arc<dyn TableProvider>> {
    if paths.is_empty() {
        return Ok(Arc::new(MemTable::try_new(schema.clone(), vec![vec![]])?));
    }
    let urls = paths
        .iter()
        .map(|p| {
            let file = Location::parse(p, Path::new("/"))?;
            Ok(ListingTableUrl::parse(file.url().as_str())?)
        })
        .collect::<Result<Vec<_>>>()?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension("");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema.clone());
    Ok(Arc::new(ListingTable::try_new(config)?))
}

/// The Iceberg field id of an Arrow field read from a Parquet file, if the file has one.
fn field_id(field: &Field) -> Option<i32> {
    field
        .metadata()
        .get(parquet::arrow::PARQUET_FIELD_ID_META_KEY)
        .and_then(|id| id.parse().ok())
}

/// The files of a table whose columns were renamed, read by Iceberg field id: the files
/// are grouped by the names their footers give the current schema's fields, each group is
/// read with its own names and projected onto the current names and types (a field a file
/// lacks is NULL), and the groups are unioned. A file without field ids is an error.
async fn by_field_id(
    ctx: &SessionContext,
    paths: &[String],
    current: &iceberg::spec::Schema,
    schema: &SchemaRef,
) -> Result<Arc<dyn TableProvider>> {
    use datafusion::logical_expr::{cast, col, lit};
    use parquet::arrow::arrow_reader::ArrowReaderMetadata;
    use parquet::arrow::async_reader::ParquetObjectReader;

    // Per group (the file name of each current column, by position): the file schema and paths.
    let mut groups: std::collections::BTreeMap<Vec<Option<String>>, (SchemaRef, Vec<String>)> =
        Default::default();
    for path in paths {
        let (store, object) = Location::parse(path, Path::new("/"))?.store()?;
        let mut reader = ParquetObjectReader::new(store, object);
        let meta = ArrowReaderMetadata::load_async(&mut reader, Default::default())
            .await
            .map_err(|e| CoreError::Source {
                source_name: path.clone(),
                message: format!("cannot read the Parquet footer: {e}"),
            })?;
        let file_schema = meta.schema().clone();
        let mut names = Vec::with_capacity(schema.fields().len());
        for field in current.as_struct().fields() {
            let found = file_schema
                .fields()
                .iter()
                .find(|f| field_id(f) == Some(field.id));
            names.push(found.map(|f| f.name().clone()));
        }
        if file_schema.fields().iter().all(|f| field_id(f).is_none()) {
            return Err(CoreError::Source {
                source_name: path.clone(),
                message: "the file has no Iceberg field ids".into(),
            });
        }
        groups
            .entry(names)
            .or_insert_with(|| (file_schema, Vec::new()))
            .1
            .push(path.clone());
    }
    let mut union: Option<datafusion::dataframe::DataFrame> = None;
    for (names, (file_schema, files)) in groups {
        let plain = Arc::new(Schema::new(
            file_schema
                .fields()
                .iter()
                .map(|f| Field::new(f.name(), f.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        let frame = ctx.read_table(parquet_files_table(&files, &plain)?)?;
        let projection: Vec<Expr> = names
            .iter()
            .zip(schema.fields())
            .map(|(name, field)| {
                let value = match name {
                    Some(name) => cast(
                        col(format!("\"{}\"", name.replace('"', "\"\""))),
                        field.data_type().clone(),
                    ),
                    None => cast(
                        lit(datafusion::common::ScalarValue::Null),
                        field.data_type().clone(),
                    ),
                };
                value.alias(field.name())
            })
            .collect();
        let frame = frame.select(projection)?;
        union = Some(match union {
            Some(all) => all.union(frame)?,
            None => frame,
        });
    }
    match union {
        Some(frame) => Ok(frame.into_view()),
        None => Ok(Arc::new(MemTable::try_new(schema.clone(), vec![vec![]])?)),
    }
}

/// The source's history from its current snapshot back, newest first.
fn upstream_history(table: &iceberg::table::Table) -> Vec<crate::incremental::Upstream> {
    crate::table::commit::current_history(table)
        .iter()
        .map(|s| crate::incremental::Upstream {
            snapshot_id: s.snapshot_id(),
            parent_id: s.parent_snapshot_id(),
            operation: s.summary().operation.as_str().to_string(),
        })
        .collect()
}

/// Why an Iceberg source's files cannot be listed.
enum UpstreamError {
    /// An appended snapshot added delete files (only a whole read applies them).
    DeletesAppended,
    Iceberg(iceberg::Error),
}

impl From<iceberg::Error> for UpstreamError {
    fn from(e: iceberg::Error) -> Self {
        UpstreamError::Iceberg(e)
    }
}

/// The data files an Iceberg source reads.
#[derive(Default)]
struct UpstreamFiles {
    /// Files no delete file applies to, read as plain Parquet.
    plain: Vec<String>,
    /// The bytes of all the data files read.
    bytes: u64,
    /// Scan tasks of the files some delete file applies to.
    with_deletes: Vec<iceberg::scan::FileScanTask>,
}

/// The data files of the table's current snapshot (only those in `only`, when given), each
/// with the delete files that apply to it.
async fn current_files(
    table: &iceberg::table::Table,
    only: Option<&[String]>,
) -> std::result::Result<UpstreamFiles, UpstreamError> {
    let mut files = UpstreamFiles::default();
    let Some(current) = table.metadata().current_snapshot_id() else {
        return Ok(files);
    };
    let only: Option<std::collections::HashSet<&str>> =
        only.map(|paths| paths.iter().map(String::as_str).collect());
    for task in crate::table::live::scan_tasks(table, current).await? {
        if only
            .as_ref()
            .is_some_and(|only| !only.contains(task.data_file_path.as_str()))
        {
            continue;
        }
        files.bytes += task.file_size_in_bytes;
        if task.deletes.is_empty() {
            files.plain.push(task.data_file_path);
        } else {
            files.with_deletes.push(task);
        }
    }
    Ok(files)
}

/// The data files `snapshots` added (each file once, in the manifest entry its own snapshot
/// wrote), and their bytes.
async fn appended_files(
    table: &iceberg::table::Table,
    snapshots: &[i64],
) -> std::result::Result<UpstreamFiles, UpstreamError> {
    let mut files = UpstreamFiles::default();
    for &id in snapshots {
        for entry in crate::table::commit::entries_added_by(table, id).await? {
            if entry.content_type() != iceberg::spec::DataContentType::Data {
                return Err(UpstreamError::DeletesAppended);
            }
            files.bytes += entry.file_size_in_bytes();
            files.plain.push(entry.file_path().to_string());
        }
    }
    Ok(files)
}

/// `plain` together with the files delete files apply to, read with the deletes applied
/// ([`crate::iceberg_scan`]); `plain` alone when there are none.
fn with_deletes_applied(
    ctx: &SessionContext,
    plain: Arc<dyn TableProvider>,
    table: &iceberg::table::Table,
    schema: &SchemaRef,
    tasks: Vec<iceberg::scan::FileScanTask>,
) -> Result<Arc<dyn TableProvider>> {
    if tasks.is_empty() {
        return Ok(plain);
    }
    let field_ids = table
        .metadata()
        .current_schema()
        .as_struct()
        .fields()
        .iter()
        .map(|f| f.id)
        .collect();
    let deletes = crate::iceberg_scan::DeletesApplied::new(
        table.metadata().location(),
        schema.clone(),
        field_ids,
        tasks,
    );
    let frame = ctx
        .read_table(plain)?
        .union(ctx.read_table(Arc::new(deletes))?)?;
    Ok(frame.into_view())
}

async fn register_source(
    ctx: &SessionContext,
    source: &SourceSpec,
    contract: &[ColumnContract],
    base_dir: &Path,
) -> Result<SourceSummary> {
    let source_err = |message: String| CoreError::Source {
        source_name: source.name.clone(),
        message,
    };
    let location_text = source.location.as_deref().unwrap_or_default();
    check_options(source)?;
    let location = Location::parse(location_text, base_dir)?;
    let table_path = listing_path(&location);
    check_glob(&table_path).map_err(source_err)?;
    let extension = file_extension(source, &table_path, default_extension(source.format));
    let found = find_files(&location, extension)
        .await
        .map_err(|e| source_err(format!("cannot list {location}: {e}")))?;
    check_case_mismatched(&found, &location, extension).map_err(source_err)?;
    if found.files == 0 {
        return Err(source_err(no_files_message(
            &location,
            location_text,
            extension,
            &found.other_names,
        )));
    }
    let declared = match source.format {
        SourceFormat::Csv => {
            let header = first_csv_header(source, &found.read).await?;
            if let Some((file, names)) = &header
                && let Some(problem) = header_name_problem(names)
            {
                return Err(source_err(format!("the header of {file}: {problem}")));
            }
            check_csv_headers(source, &found.read, header.as_ref()).await?;
            header.and_then(|(_, names)| declared_csv_schema(&names, contract))
        }
        _ => None,
    };
    let (files, bytes) = (found.files, found.bytes);
    let raw_name = raw_table_name(&source.name);
    // Inferred from these files before, read the same way: not inferred again.
    let reading = format_reading(&raw_listing_options(ctx, source, &table_path)?);
    let inferred_key = match declared {
        Some(_) => None,
        None => inspection_key("inferred schema", &reading, &found.versions),
    };
    let inferred = match remembered(inferred_key).await {
        Some(Inspection::Schema(schema)) => Some(schema.as_ref().clone()),
        _ => None,
    };
    let known = declared.as_ref().or(inferred.as_ref());
    match register_raw(ctx, source, &raw_name, &table_path, known).await {
        Err(e) if source.format != SourceFormat::Json && is_merge_refusal(&e) => {
            let widened = widened_schema(ctx, source, &table_path, &found.read)
                .await?
                .map_err(source_err)?;
            register_raw(ctx, source, &raw_name, &table_path, Some(&widened)).await?;
        }
        registered => registered?,
    }
    let mut raw_schema = ctx.table_provider(raw_name.as_str()).await?.schema();
    if known.is_none() {
        remember(inferred_key, Inspection::Schema(raw_schema.clone())).await;
    }
    if source.format == SourceFormat::Csv
        && let Some(text) = null_columns_as_text(&raw_schema)
    {
        ctx.deregister_table(raw_name.as_str())?;
        register_raw(ctx, source, &raw_name, &table_path, Some(&text)).await?;
        raw_schema = Arc::new(text);
    }
    if source.format == SourceFormat::Csv
        && let Some(text) = leading_zeros_as_text(
            ctx,
            source,
            &table_path,
            (&reading, &found.versions),
            &raw_schema,
            contract,
        )
        .await?
    {
        ctx.deregister_table(raw_name.as_str())?;
        register_raw(ctx, source, &raw_name, &table_path, Some(&text)).await?;
        raw_schema = Arc::new(text);
    }
    if let Some(utc) = timestamps_in_utc(&raw_schema) {
        ctx.deregister_table(raw_name.as_str())?;
        register_raw(ctx, source, &raw_name, &table_path, Some(&utc)).await?;
        raw_schema = Arc::new(utc);
    }
    let schema = match source.format {
        SourceFormat::Parquet => {
            check_contract(source, &location, &raw_schema, contract)?;
            raw_schema
        }
        _ if contract.is_empty() => raw_schema,
        _ => {
            if source.format == SourceFormat::Json {
                check_json_integers(source, &location, &table_path, &raw_schema, contract)?;
            }
            let with_contract = apply_contract(source, &location, &raw_schema, contract)?;
            ctx.deregister_table(raw_name.as_str())?;
            register_raw(ctx, source, &raw_name, &table_path, Some(&with_contract)).await?;
            Arc::new(with_contract)
        }
    };
    if source.format == SourceFormat::Csv {
        match source.options.get("null_value") {
            // Reads text and casts it, which rounds a decimal.
            Some(marker) => {
                read_null_value_as_null(ctx, source, &raw_name, &table_path, &schema, marker)
                    .await?
            }
            None => read_decimals_rounded(ctx, source, &raw_name, &table_path, &schema).await?,
        }
    }
    register_view(ctx, source, &raw_name, &schema, contract, &location).await?;
    Ok(SourceSummary {
        name: source.name.clone(),
        format: source.format,
        location: location.to_string(),
        files,
        bytes,
        schema,
        snapshot_id: None,
        consumed: None,
        read: None,
        nothing_new: false,
    })
}

/// Makes the raw table `raw_name` read the CSV option `null_value` (`marker`) as NULL: the
/// files are read as text and each column is `CAST(NULLIF(column, marker) AS type)` of
/// `schema`. DataFusion 53 uses `null_value` when it infers the types but not when it reads
/// the rows (`CsvSource` never hands its pattern to the reader), so the marker was
/// published as text in a string column and failed a number column that inference had
/// typed because of it. A value that is neither the marker nor of its type fails the cast,
/// naming the value (not the line, which only the reader knows).
async fn read_null_value_as_null(
    ctx: &SessionContext,
    source: &SourceSpec,
    raw_name: &str,
    table_path: &str,
    schema: &Schema,
    marker: &str,
) -> Result<()> {
    use datafusion::functions::expr_fn::nullif;
    use datafusion::logical_expr::{cast, ident, lit};
    let columns: Vec<Expr> = schema
        .fields()
        .iter()
        .map(|f| {
            let value = nullif(ident(f.name()), lit(marker));
            let typed = match f.data_type() {
                DataType::Utf8 => value,
                other => cast(value, other.clone()),
            };
            typed.alias(f.name())
        })
        .collect();
    let text_name = format!("{raw_name}__text");
    let text = as_text(schema);
    register_view_of_reread(
        ctx,
        source,
        raw_name,
        table_path,
        (&text_name, &text),
        columns,
    )
    .await
}

/// Replaces the raw table `raw_name` by a view of `columns` over its files read again as the
/// table `read` names, of the schema it gives: the one step of [`read_null_value_as_null`]
/// (text, then the marker as NULL) and [`read_decimals_rounded`] (one place finer, then the
/// declared decimal).
async fn register_view_of_reread(
    ctx: &SessionContext,
    source: &SourceSpec,
    raw_name: &str,
    table_path: &str,
    (read_name, read_schema): (&str, &Schema),
    columns: Vec<Expr>,
) -> Result<()> {
    ctx.deregister_table(raw_name)?;
    register_raw(ctx, source, read_name, table_path, Some(read_schema)).await?;
    let view = ctx.table(read_name).await?.select(columns)?;
    ctx.register_table(raw_name, view.into_view())?;
    Ok(())
}

/// Makes the raw table `raw_name` round a CSV value with more decimal places than its
/// contract's `decimal(p, s)` (`12.345` under `decimal(15, 2)`: 12.35), as a SQL `CAST`,
/// DuckDB and Spark do; the CSV reader drops the extra places (12.34). The files are read
/// one place finer ([`decimals_one_place_finer`]) and each such column cast to its declared
/// type. One place is enough: dropping the places after it cannot carry a value across the
/// half-way point of the last declared place. Too many whole digits still fail in the
/// reader, which names the value (a job's task adds the file).
async fn read_decimals_rounded(
    ctx: &SessionContext,
    source: &SourceSpec,
    raw_name: &str,
    table_path: &str,
    schema: &Schema,
) -> Result<()> {
    use datafusion::logical_expr::{cast, ident};
    let Some(finer) = decimals_one_place_finer(schema) else {
        return Ok(());
    };
    let columns: Vec<Expr> = schema
        .fields()
        .iter()
        .zip(finer.fields())
        .map(|(declared, read)| {
            let column = ident(declared.name());
            match declared.data_type() == read.data_type() {
                true => column,
                false => cast(column, declared.data_type().clone()).alias(declared.name()),
            }
        })
        .collect();
    let finer_name = format!("{raw_name}__finer");
    register_view_of_reread(
        ctx,
        source,
        raw_name,
        table_path,
        (&finer_name, &finer),
        columns,
    )
    .await
}

/// `schema` with each `decimal(p, s)` read as `decimal(p + 1, s + 1)` (the same whole
/// digits, one more place), or `None` when it has no decimal that can be (`p` = 38, the
/// most a 128-bit decimal holds, keeps the reader's rounding toward zero).
fn decimals_one_place_finer(schema: &Schema) -> Option<Schema> {
    let mut finer = false;
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|field| match field.data_type() {
            DataType::Decimal128(p, s) if *p < 38 => {
                finer = true;
                field
                    .as_ref()
                    .clone()
                    .with_data_type(DataType::Decimal128(p + 1, s + 1))
            }
            _ => field.as_ref().clone(),
        })
        .collect();
    finer.then(|| Schema::new(fields))
}

/// `schema`'s columns, each read as text (the CSV reader then reads every value as written).
fn as_text(schema: &Schema) -> Schema {
    Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    )
}

/// The longest header line compared by [`check_csv_headers`]; a longer one is not compared.
const MAX_CSV_HEADER_BYTES: u64 = 1 << 20;

/// A CSV source's files in name order, so that "the first file" (whose header the reader
/// takes) and the files a message names are the same whatever order the listing has.
fn in_name_order(files: &[(Location, u64)]) -> Vec<(Location, u64)> {
    let mut files = files.to_vec();
    files.sort_by_cached_key(|(location, _)| location.as_url_string());
    files
}

/// The delimiter and quote a CSV source's files are read with.
fn csv_delimiter_and_quote(source: &SourceSpec) -> Result<(u8, u8)> {
    Ok((
        csv_byte_option(source, "delimiter")?.unwrap_or(b','),
        csv_byte_option(source, "quote")?.unwrap_or(b'"'),
    ))
}

/// The column names the header of the CSV file at `location` (of `size` bytes) gives,
/// parsed as the reader parses it; `None` when it cannot be read.
async fn csv_header_names(
    location: Location,
    size: u64,
    (delimiter, quote): (u8, u8),
) -> Option<Vec<String>> {
    csv_header(&location, size)
        .await
        .and_then(|line| header_names(&line, delimiter, quote))
}

/// The first file of a CSV source with a header (in name order) and the column names its
/// header gives: what the reader names the columns by. `None` without a header or when it
/// cannot be read (the reader reports that file itself).
async fn first_csv_header(
    source: &SourceSpec,
    files: &[(Location, u64)],
) -> Result<Option<(Location, Vec<String>)>> {
    if !csv_has_header(source)? {
        return Ok(None);
    }
    let Some(first) = in_name_order(files).into_iter().next() else {
        return Ok(None);
    };
    let (location, size) = first;
    Ok(
        csv_header_names(location.clone(), size, csv_delimiter_and_quote(source)?)
            .await
            .map(|names| (location, names)),
    )
}

/// What makes a CSV header's `names` unfit to be columns: a name given twice (the reader
/// failed with "incorrect number of fields", naming no file), or none at all (a trailing
/// delimiter made a column named ``). Columns are counted from 1, as a spreadsheet does.
fn header_name_problem(names: &[String]) -> Option<String> {
    if let Some(i) = names.iter().position(|n| n.trim().is_empty()) {
        return Some(format!(
            "column {} has no name{}: name it, or remove the delimiter that makes it",
            i + 1,
            if i + 1 == names.len() {
                " (a delimiter at the end of the line?)"
            } else {
                ""
            }
        ));
    }
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, name) in names.iter().enumerate() {
        if let Some(first) = seen.insert(name.as_str(), i) {
            return Some(format!(
                "columns {} and {} are both named `{name}`: give each column its own name",
                first + 1,
                i + 1
            ));
        }
    }
    None
}

/// Every file of a CSV source with a header must name the same columns, in the same order,
/// as its first file (`first`, from [`first_csv_header`]): the reader takes the first
/// file's header and reads every file by column position, so a file exported with its
/// columns reordered (`price,qty,id`) put its prices in `id`, silently. The headers are read
/// at planning (one ranged read per file, 16 at a time), so the error names both files
/// before anything runs.
async fn check_csv_headers(
    source: &SourceSpec,
    files: &[(Location, u64)],
    first: Option<&(Location, Vec<String>)>,
) -> Result<()> {
    let Some((first, expected)) = first else {
        return Ok(());
    };
    let format = csv_delimiter_and_quote(source)?;
    let others: Vec<(Location, u64)> = in_name_order(files)
        .into_iter()
        .filter(|(location, _)| location != first)
        .collect();
    let mut others = futures::stream::iter(others)
        .map(|(location, size)| async move {
            let names = csv_header_names(location.clone(), size, format).await;
            (location, names)
        })
        .buffered(16);
    while let Some((file, names)) = others.next().await {
        match names {
            Some(names) if &names != expected => {
                return Err(CoreError::Source {
                    source_name: source.name.clone(),
                    message: format!(
                        "{file} names its columns `{}` where {first} names them `{}`: the files of a CSV source are read by column position, so every file must name the same columns in the same order",
                        names.join(","),
                        expected.join(",")
                    ),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// A one-byte CSV option (`delimiter`, `quote`, `escape`): one character, or `\t`; the
/// reader and the header check read it alike.
fn csv_byte_option(source: &SourceSpec, key: &str) -> Result<Option<u8>> {
    match source.options.get(key) {
        None => Ok(None),
        Some(v) if v.len() == 1 => Ok(Some(v.as_bytes()[0])),
        Some(v) if v == "\\t" => Ok(Some(b'\t')),
        Some(v) => Err(CoreError::Source {
            source_name: source.name.clone(),
            message: format!("csv option `{key}` must be one character, got `{v}`"),
        }),
    }
}

/// Whether a CSV source's files start with a header (option `header`, default true).
fn csv_has_header(source: &SourceSpec) -> Result<bool> {
    match source.options.get("header").map(String::as_str) {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(CoreError::Source {
            source_name: source.name.clone(),
            message: format!("csv option `header` must be true or false, got `{other}`"),
        }),
    }
}

/// The first line of the CSV file at `location` (of `size` bytes), without its line end or
/// a byte order mark; `None` when it cannot be read or is longer than
/// [`MAX_CSV_HEADER_BYTES`] (the reader reports such files itself).
async fn csv_header(location: &Location, size: u64) -> Option<Vec<u8>> {
    let (store, key) = location.store().ok()?;
    let head = store
        .get_range(&key, 0..size.min(MAX_CSV_HEADER_BYTES))
        .await
        .ok()?;
    let end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    if end == head.len() && size > MAX_CSV_HEADER_BYTES {
        return None;
    }
    let line = head[..end].strip_suffix(b"\r").unwrap_or(&head[..end]);
    let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
    Some(line.to_vec())
}

/// The schema a CSV source's contract declares for every column its first file's header
/// names (`names`, in the header's order); `None` when the contract leaves a column out
/// (its type is inferred). Inference merged each file's own types, so a directory whose
/// one night's amounts were whole (`bigint`) and the next's were not (`double`) was
/// refused, contract or not, and a bad value in a declared column failed as "Fail to merge
/// schema" without its file or line; read as declared, the reader names them.
fn declared_csv_schema(names: &[String], contract: &[ColumnContract]) -> Option<Schema> {
    if contract.is_empty() {
        return None;
    }
    let fields: Option<Vec<Field>> = names
        .iter()
        .map(|name| {
            let column = contract.iter().find(|c| &c.name == name)?;
            Some(Field::new(name, column.data_type.clone(), true))
        })
        .collect();
    fields.map(Schema::new)
}

/// Whether schema inference refused to merge two files' types for one column (DataFusion
/// names no file).
fn is_merge_refusal(error: &CoreError) -> bool {
    error.to_string().contains("Fail to merge schema")
}

/// The schema of a source whose files infer different types for a column that one type
/// holds: a Parquet directory of integers of different widths (Spark's `int` one night,
/// pandas' `int64` the next) or `float` and `double` ([`widest_type`], as DuckDB reads
/// them); a CSV directory of whole amounts one night and `10.5` the next
/// ([`widest_csv_type`]: `double`, as one file holding both is inferred). Each file's
/// schema is inferred as DataFusion infers a source's, and the types merged; the reader
/// reads each file's column as the merged type. Any other difference is refused naming both
/// files (the inner `Err`).
async fn widened_schema(
    ctx: &SessionContext,
    source: &SourceSpec,
    table_path: &str,
    files: &[(Location, u64)],
) -> Result<std::result::Result<Schema, String>> {
    type Widen = fn(&DataType, &DataType) -> Option<DataType>;
    let (widen, rule): (Widen, &str) = match source.format {
        SourceFormat::Csv => (
            widest_csv_type,
            "whole numbers and decimals are read as double",
        ),
        _ => (
            widest_type,
            "integers of different widths are read as the widest, float and double as double",
        ),
    };
    let listing = raw_listing_options(ctx, source, table_path)?;
    let state = ctx.state();
    // In name order, as DataFusion infers, so a refusal names the same files every time.
    let mut files: Vec<&Location> = files.iter().map(|(location, _)| location).collect();
    files.sort_by_key(|location| location.to_string());
    // Each column's type so far, and the file that gave it.
    let mut merged: Vec<(Field, &Location)> = Vec::new();
    for location in files {
        let (store, path) = location.store()?;
        let meta = store.head(&path).await?;
        let schema = listing.format.infer_schema(&state, &store, &[meta]).await?;
        for field in schema.fields() {
            let Some((seen, first)) = merged.iter_mut().find(|(f, _)| f.name() == field.name())
            else {
                merged.push((field.as_ref().clone(), location));
                continue;
            };
            let Some(widest) = widen(seen.data_type(), field.data_type()) else {
                return Ok(Err(format!(
                    "column `{}` is {} in {first} but {} in {location}; a source's files must agree on each column's type ({rule})",
                    field.name(),
                    seen.data_type(),
                    field.data_type()
                )));
            };
            if &widest != seen.data_type() {
                *first = location;
            }
            let nullable = seen.is_nullable() || field.is_nullable();
            *seen = seen.clone().with_data_type(widest).with_nullable(nullable);
        }
    }
    Ok(Ok(Schema::new(
        merged.into_iter().map(|(f, _)| f).collect::<Vec<_>>(),
    )))
}

/// The type that holds every value of both `a` and `b`, when the one only widens the
/// other: integers of different widths (signed, or an unsigned one narrower than the
/// signed), `float` and `double`. `None`: another difference.
fn widest_type(a: &DataType, b: &DataType) -> Option<DataType> {
    use DataType::*;
    // (signed, bits) of an integer type.
    let integer = |t: &DataType| match t {
        Int8 => Some((true, 8)),
        Int16 => Some((true, 16)),
        Int32 => Some((true, 32)),
        Int64 => Some((true, 64)),
        UInt8 => Some((false, 8)),
        UInt16 => Some((false, 16)),
        UInt32 => Some((false, 32)),
        UInt64 => Some((false, 64)),
        _ => None,
    };
    if a == b || *b == Null {
        return Some(a.clone());
    }
    if *a == Null {
        return Some(b.clone());
    }
    if matches!((a, b), (Float32 | Float64, Float32 | Float64)) {
        return Some(Float64);
    }
    let ((a_signed, a_bits), (b_signed, b_bits)) = (integer(a)?, integer(b)?);
    let wider = if a_bits >= b_bits { a } else { b };
    match (a_signed, b_signed) {
        (x, y) if x == y => Some(wider.clone()),
        // One signed, one unsigned: the signed one, if it is the wider.
        (true, false) => (a_bits > b_bits).then(|| a.clone()),
        _ => (b_bits > a_bits).then(|| b.clone()),
    }
}

/// The type that holds both of two CSV files' inferred types for a column: [`widest_type`],
/// or `double` for whole numbers in one file and decimals in the other, as inference types
/// a column of one file holding both. Any other difference (text and numbers, dates and
/// numbers) is `None`: most likely a file of another layout, refused rather than read as
/// text.
fn widest_csv_type(a: &DataType, b: &DataType) -> Option<DataType> {
    use DataType::*;
    match (a, b) {
        (Int64, Float64) | (Float64, Int64) => Some(Float64),
        _ => widest_type(a, b),
    }
}

/// The column names a CSV header line gives, parsed as the reader parses it.
fn header_names(line: &[u8], delimiter: u8, quote: u8) -> Option<Vec<String>> {
    let format = arrow::csv::reader::Format::default()
        .with_header(true)
        .with_delimiter(delimiter)
        .with_quote(quote);
    let (schema, _) = format
        .infer_schema(std::io::Cursor::new(line), Some(0))
        .ok()?;
    Some(schema.fields().iter().map(|f| f.name().clone()).collect())
}

/// `schema` with its `Null` columns read as text, if it has any. CSV schema inference types
/// a column it saw empty in every row it sampled (the first thousand) as `Null`, and the
/// reader then dropped the column's later values: a note on row 1,400 was published as
/// NULL, whatever the SQL cast it to. As text, every value is read; the SQL casts it.
fn null_columns_as_text(schema: &Schema) -> Option<Schema> {
    if !schema
        .fields()
        .iter()
        .any(|f| f.data_type() == &DataType::Null)
    {
        return None;
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Null => f.as_ref().clone().with_data_type(DataType::Utf8),
            _ => f.as_ref().clone(),
        })
        .collect();
    Some(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// `schema` with each integer column inference typed (one the contract does not declare)
/// read as text when one of its values has a leading zero (`007`, `-01`), as DuckDB's CSV
/// reader types such a column: as an integer, the zip code `00501` and the id `007` were
/// published as 501 and 7, silently. Every row is looked at (inference sees the first
/// thousand), reading the files once more while planning, unless this process looked at
/// the same versions of the files (`files`), read the same way (`reading`), before
/// ([`crate::file_inspections`]); a contract avoids it. `None`: no column changes.
async fn leading_zeros_as_text(
    ctx: &SessionContext,
    source: &SourceSpec,
    table_path: &str,
    (reading, files): (&str, &[FileVersion]),
    schema: &Schema,
    contract: &[ColumnContract],
) -> Result<Option<Schema>> {
    let inferred_integers: Vec<&str> = schema
        .fields()
        .iter()
        .filter(|f| f.data_type().is_integer() && !contract.iter().any(|c| &c.name == f.name()))
        .map(|f| f.name().as_str())
        .collect();
    if inferred_integers.is_empty() {
        return Ok(None);
    }
    let key = inspection_key(
        "leading zeros",
        &format!("{reading} {inferred_integers:?}"),
        files,
    );
    let zeros = match remembered(key).await {
        Some(Inspection::LeadingZeros(zeros)) => zeros,
        _ => {
            let zeros: Arc<[bool]> =
                probe_leading_zeros(ctx, source, table_path, schema, &inferred_integers)
                    .await?
                    .into();
            remember(key, Inspection::LeadingZeros(zeros.clone())).await;
            zeros
        }
    };
    let as_text: Vec<&str> = inferred_integers
        .iter()
        .zip(zeros.iter())
        .filter(|(_, zero)| **zero)
        .map(|(c, _)| *c)
        .collect();
    if as_text.is_empty() {
        return Ok(None);
    }
    tracing::info!(source = %source.name, columns = %as_text.join(", "), "integer columns with leading zeros are read as text");
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            if as_text.contains(&f.name().as_str()) {
                f.as_ref().clone().with_data_type(DataType::Utf8)
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    Ok(Some(Schema::new_with_metadata(
        fields,
        schema.metadata().clone(),
    )))
}

/// For each of `inferred_integers` (columns of `schema`, the raw table's), whether a value's
/// text has a leading zero: the files at `table_path` read as text.
async fn probe_leading_zeros(
    ctx: &SessionContext,
    source: &SourceSpec,
    table_path: &str,
    schema: &Schema,
    inferred_integers: &[&str],
) -> Result<Vec<bool>> {
    use datafusion::arrow::array::AsArray;
    let text = as_text(schema);
    let text_name = format!("{}__zeros", raw_table_name(&source.name));
    register_raw(ctx, source, &text_name, table_path, Some(&text)).await?;
    // The columns' text scanned here, not by a query of `regexp_like`: planning that query
    // and compiling its pattern were about half of the job API's time per submission of a
    // CSV source (see load-tests/README.md). The scan stops once every column has one.
    let found = async {
        let mut zeros = vec![false; inferred_integers.len()];
        // The table's own scan, without a query's optimizer passes: it only reads.
        let provider = ctx.table_provider(text_name.as_str()).await?;
        let columns: Vec<usize> = inferred_integers
            .iter()
            .map(|c| text.index_of(c))
            .collect::<std::result::Result<_, _>>()?;
        let scan = provider
            .scan(&ctx.state(), Some(&columns), &[], None)
            .await?;
        let mut batches = datafusion::physical_plan::execute_stream(scan, ctx.task_ctx())?;
        while let Some(batch) = batches.next().await {
            let batch = batch?;
            for (seen, column) in zeros.iter_mut().zip(batch.columns()) {
                // Read as `Utf8` (the schema says so); the cast only guards another string type.
                let text = datafusion::arrow::compute::cast(column, &DataType::Utf8)?;
                *seen = *seen
                    || text
                        .as_string::<i32>()
                        .iter()
                        .flatten()
                        .any(has_leading_zero);
            }
            if zeros.iter().all(|z| *z) {
                break;
            }
        }
        Ok::<_, datafusion::error::DataFusionError>(zeros)
    }
    .await;
    ctx.deregister_table(text_name.as_str())?;
    Ok(found?)
}

/// Whether an integer's text has a leading zero, as DuckDB's CSV reader judges it: after
/// any white space and a sign, a `0` followed by a digit (`007`, ` -01`; not `0`, `0.5`).
fn has_leading_zero(text: &str) -> bool {
    let digits = text.trim_start();
    let digits = digits.strip_prefix(['+', '-']).unwrap_or(digits);
    let mut bytes = digits.bytes();
    bytes.next() == Some(b'0') && bytes.next().is_some_and(|b| b.is_ascii_digit())
}

/// `schema` with each timestamp column zoned other than UTC read in UTC (`None`: there is
/// none). The instants are the same; only the zone DataFusion computes in changes. A
/// Parquet column annotated `America/New_York` made `CAST(t AS DATE)`, `date_trunc` and
/// `extract(hour ...)` answer in New York time, while the table stores the instant (an
/// Iceberg `timestamptz` is UTC) and files the row by its UTC day: the same instant
/// exported with another zone published another date, silently.
fn timestamps_in_utc(schema: &Schema) -> Option<Schema> {
    let zoned = |t: &DataType| matches!(t, DataType::Timestamp(_, Some(tz)) if !is_utc(tz));
    if !schema.fields().iter().any(|f| zoned(f.data_type())) {
        return None;
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Timestamp(unit, Some(tz)) if !is_utc(tz) => f
                .as_ref()
                .clone()
                .with_data_type(DataType::Timestamp(*unit, Some("UTC".into()))),
            _ => f.as_ref().clone(),
        })
        .collect();
    Some(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// Whether the zone `tz` is UTC by one of its names.
fn is_utc(tz: &str) -> bool {
    matches!(
        tz,
        "UTC" | "utc" | "Z" | "+00:00" | "+0000" | "+00" | "Etc/UTC" | "Etc/UCT" | "UCT"
    )
}

fn check_options(source: &SourceSpec) -> Result<()> {
    let allowed = match source.format {
        SourceFormat::Csv => CSV_OPTIONS,
        SourceFormat::Json => JSON_OPTIONS,
        SourceFormat::Parquet | SourceFormat::Iceberg => PARQUET_OPTIONS,
    };
    for key in source.options.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(CoreError::Source {
                source_name: source.name.clone(),
                message: format!(
                    "unknown {} option `{key}`; known options: {}",
                    source.format,
                    allowed.join(", ")
                ),
            });
        }
    }
    Ok(())
}

/// The files a location names, as the reader reads them.
#[derive(Debug, Default)]
struct FoundFiles {
    /// Files read, and their bytes.
    files: usize,
    bytes: u64,
    /// The files read, each with its size.
    read: Vec<(Location, u64)>,
    /// The files read, each as the store reports it.
    versions: Vec<FileVersion>,
    /// A few names of the files there that are not read (in a sub-directory, or not ending
    /// in the extension).
    other_names: Vec<String>,
    /// A few files directly in the directory whose names end in the extension but for case
    /// (`FEB.CSV` beside `jan.csv`): surely data, and refused rather than left out.
    case_mismatched: Vec<String>,
}

impl FoundFiles {
    /// Notes the file at `relative` (below the directory) if it is not read only because its
    /// extension differs from `extension` in case.
    fn note_case_mismatch(&mut self, relative: &str, extension: &str) {
        if self.case_mismatched.len() < 3 && differs_from_read_in_case_only(relative, extension) {
            self.case_mismatched
                .push(relative.trim_start_matches('/').to_string());
        }
    }

    /// Counts `path` (of `size` bytes, at `location`, tagged `tag` by its store) if `read`.
    fn add(&mut self, location: Location, path: &str, size: u64, tag: Option<String>, read: bool) {
        if read {
            self.files += 1;
            self.bytes += size;
            self.versions.push(FileVersion {
                path: location.to_string(),
                size,
                tag,
            });
            self.read.push((location, size));
        } else if self.other_names.len() < 3 {
            self.other_names
                .push(path.rsplit('/').next().unwrap_or(path).to_string());
        }
    }
}

/// Whether the file at `relative` would be read but for the case of its extension.
fn differs_from_read_in_case_only(relative: &str, extension: &str) -> bool {
    !extension.is_empty()
        && !listing_reads(relative, extension)
        && listing_reads(
            &relative.to_ascii_lowercase(),
            &extension.to_ascii_lowercase(),
        )
}

/// Refuses a directory holding files whose extension differs from the one read only in
/// case: they were left out with a warning, and the job published without their rows.
fn check_case_mismatched(
    found: &FoundFiles,
    location: &Location,
    extension: &str,
) -> std::result::Result<(), String> {
    if found.case_mismatched.is_empty() {
        return Ok(());
    }
    let (them, their) = match found.case_mismatched.len() {
        1 => ("it", "its"),
        _ => ("them", "their"),
    };
    Err(format!(
        "{location} holds {} ending in `{extension}` but for case, which the reader would leave out: rename {them}, or read {them} as a source of {their} own with options.file_extension set to {their} extension",
        found.case_mismatched.join(", "),
    ))
}

/// The extension a directory's files are read by when the source names none (the reader's,
/// [`register_raw`], and the count's, [`find_files`]).
fn default_extension(format: SourceFormat) -> &'static str {
    match format {
        SourceFormat::Csv => ".csv",
        SourceFormat::Json => ".json",
        SourceFormat::Parquet | SourceFormat::Iceberg => ".parquet",
    }
}

/// Why a location gave no file to read, and what to do.
fn no_files_message(
    location: &Location,
    location_text: &str,
    extension: &str,
    other_names: &[String],
) -> String {
    let mut message = format!("no files found at {location} (from location = \"{location_text}\")");
    if !other_names.is_empty() {
        message.push_str(&format!(
            "; files there in a sub-directory or not ending in `{extension}` are not read (such as {}): name them with a glob such as dir/*.CSV, or set options.file_extension",
            other_names.join(", ")
        ));
    }
    message
}

/// Whether DataFusion's listing of a directory reads the file at `relative` (below the
/// directory): a file directly in it or in `key=value` directories only (its
/// `listing_table_ignore_subdirectory`), ending in `extension` (case and all; any file when
/// empty).
fn listing_reads(relative: &str, extension: &str) -> bool {
    let plain_segments = relative
        .split('/')
        .filter(|s| !s.is_empty() && !s.contains('='))
        .count();
    plain_segments == 1 && relative.ends_with(extension)
}

/// A glob whose wildcard is in a directory (`data/*/x.csv`) reads nothing with DataFusion's
/// listing, which matches the pattern against file names in the fixed prefix only.
fn check_glob(text: &str) -> std::result::Result<(), String> {
    let Some((dirs, _file)) = text.rsplit_once('/') else {
        return Ok(());
    };
    if dirs.contains(['*', '?', '[']) {
        return Err(format!(
            "a wildcard may only be in the file name, as in data/*.csv, not in a directory: {text}; list the directories as sources of their own, or name their common parent"
        ));
    }
    Ok(())
}

/// Counts the files (and their bytes) a location names as the reader reads them: a file; a
/// directory's visible files ([`listing_reads`]); the files a glob on file names matches.
async fn find_files(location: &Location, extension: &str) -> Result<FoundFiles> {
    let mut found = FoundFiles::default();
    if let Some(path) = location.local_path() {
        let text = path.display().to_string();
        if text.contains(['*', '?', '[']) {
            let paths = glob::glob(&text).map_err(|e| {
                CoreError::io(
                    format!("bad glob {text}: {e}"),
                    std::io::ErrorKind::InvalidInput.into(),
                )
            })?;
            for entry in paths.flatten() {
                let name = entry.display().to_string();
                if let Ok(meta) = std::fs::metadata(&entry)
                    && meta.is_file()
                    && let Ok(file) = Location::parse(&name, Path::new("/"))
                {
                    found.add(file, &name, meta.len(), local_tag(&meta), true);
                }
            }
            return Ok(found);
        }
        return match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {
                found.add(location.clone(), &text, meta.len(), local_tag(&meta), true);
                Ok(found)
            }
            Ok(_) => {
                let dir = location.url().path().trim_end_matches('/').to_string();
                for (l, meta) in list_objects_meta(location).await? {
                    let file = l.url().path().to_string();
                    if !is_hidden(&file) {
                        let relative = file.strip_prefix(&dir).unwrap_or(&file);
                        let reads = listing_reads(relative, extension);
                        found.note_case_mismatch(relative, extension);
                        found.add(l, &file, meta.size, meta.e_tag, reads);
                    }
                }
                if found.files > 0 && !found.other_names.is_empty() {
                    tracing::warn!(
                        location = %location,
                        not_read = ?found.other_names,
                        "files below the source's directory that are not read: in a sub-directory, or not ending in `{extension}`"
                    );
                }
                Ok(found)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(found),
            Err(e) => Err(CoreError::io(format!("read {}", path.display()), e)),
        };
    }
    // A remote directory is read as a local one is ([`visible_files`]).
    let dir = location.url().path();
    let directory = dir.ends_with('/');
    for (l, meta) in list_objects_meta(location).await? {
        let file = l.url().path().to_string();
        let read = match file.strip_prefix(dir) {
            Some(relative) if directory && !is_hidden(&file) => {
                found.note_case_mismatch(relative, extension);
                listing_reads(relative, extension)
            }
            Some(_) if directory => false,
            _ => file.ends_with(extension),
        };
        found.add(l, &file, meta.size, meta.e_tag, read);
    }
    Ok(found)
}

fn is_hidden(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with('.') || name.starts_with('_'))
}

/// DataFusion takes globs on plain local paths and URLs elsewhere; directories need a
/// trailing slash.
fn listing_path(location: &Location) -> String {
    match location.local_path() {
        Some(path) if path.is_dir() => format!("{}/", path.display()),
        Some(path) => path.display().to_string(),
        None => location.as_url_string(),
    }
}

fn file_extension<'a>(source: &'a SourceSpec, table_path: &'a str, default: &'a str) -> &'a str {
    if let Some(ext) = source.options.get("file_extension") {
        return ext;
    }
    // A single named file is read whatever its extension, and a glob's pattern names its
    // files itself (`data/*.CSV`).
    if !table_path.ends_with('/') || table_path.contains(['*', '?', '[']) {
        return "";
    }
    default
}

async fn register_raw(
    ctx: &SessionContext,
    source: &SourceSpec,
    raw_name: &str,
    table_path: &str,
    schema: Option<&Schema>,
) -> Result<()> {
    let listing = raw_listing_options(ctx, source, table_path)?;
    let registered = register_listing(ctx, raw_name, table_path, listing, schema).await;
    registered.map_err(|e| {
        let message = match source.format {
            SourceFormat::Parquet => find_bad_parquet(table_path),
            SourceFormat::Json => {
                find_bad_json(table_path).or_else(|| find_json_type_conflict(table_path))
            }
            _ => None,
        }
        .unwrap_or_else(|| {
            format!(
                "cannot read {table_path}: {}",
                crate::task::clean_message(&e.to_string())
            )
        });
        CoreError::Source {
            source_name: source.name.clone(),
            message,
        }
    })
}

/// How the raw table of `source` (files at `table_path`) reads its files: the format and
/// its options (a CSV source's delimiter, quote, header and null marker), and the extension
/// [`find_files`] counted the files by.
fn raw_listing_options(
    ctx: &SessionContext,
    source: &SourceSpec,
    table_path: &str,
) -> Result<ListingOptions> {
    let extension = file_extension(source, table_path, default_extension(source.format));
    let (config, table_options) = (ctx.copied_config(), ctx.copied_table_options());
    Ok(match source.format {
        SourceFormat::Parquet => ParquetReadOptions::default()
            .file_extension(extension)
            .to_listing_options(&config, table_options),
        SourceFormat::Csv => {
            let byte_option = |key: &str| csv_byte_option(source, key);
            let mut options = CsvReadOptions::new()
                .has_header(csv_has_header(source)?)
                // Keeps each CSV file in one task, so line numbers in errors are the file's.
                .newlines_in_values(true)
                .file_extension(extension)
                .null_regex(
                    source
                        .options
                        .get("null_value")
                        .map(|v| null_value_regex(v)),
                );
            if let Some(d) = byte_option("delimiter")? {
                options = options.delimiter(d);
            }
            if let Some(q) = byte_option("quote")? {
                options = options.quote(q);
            }
            if let Some(e) = byte_option("escape")? {
                options = options.escape(e);
            }
            options.to_listing_options(&config, table_options)
        }
        // Types are inferred from every record of every file: arrow-json's default, the
        // first 1000 records of the first file, typed `price` bigint when its first values
        // were whole, and a later `19.99` was then read as 19 (the integer reader truncates
        // a fraction), and keys first seen later were dropped.
        SourceFormat::Json => JsonReadOptions::default()
            .file_extension(extension)
            .schema_infer_max_records(usize::MAX)
            .to_listing_options(&config, table_options),
        SourceFormat::Iceberg => unreachable!("iceberg sources are registered by register_iceberg"),
    })
}

/// How `listing` reads a file, in words: the format with its options (a CSV file's
/// delimiter, quote, header, null marker, the rows inference samples; a Parquet file's
/// reading of its types) and the extension. What a session plans with it (the partitions
/// it splits the files into, statistics) is left out: sessions that plan differently read a
/// file alike.
fn format_reading(listing: &ListingOptions) -> String {
    format!("{:?} {}", listing.format, listing.file_extension)
}

/// Registers the files at `table_path` as the table `name`, read with `listing` and of
/// `schema` (inferred when `None`), as `SessionContext::register_csv` and its siblings do,
/// except that a directory's hidden files (named `.*` or `_*`: an upload in progress, a
/// writer's marker) are not read, as Spark and Hive skip them and as [`find_files`]
/// counts.
async fn register_listing(
    ctx: &SessionContext,
    name: &str,
    table_path: &str,
    listing: ListingOptions,
    schema: Option<&Schema>,
) -> datafusion::error::Result<()> {
    let url = visible_files(
        ListingTableUrl::parse(table_path)?,
        table_path,
        &listing.file_extension,
    )?;
    let schema = match schema {
        Some(schema) => Arc::new(schema.clone()),
        None => listing.infer_schema(&ctx.state(), &url).await?,
    };
    let config = ListingTableConfig::new(url)
        .with_listing_options(listing)
        .with_schema(schema);
    ctx.register_table(name, Arc::new(ListingTable::try_new(config)?))?;
    Ok(())
}

/// `url` (of `table_path`) reading only the visible files of a directory: those whose name
/// starts with neither `.` nor `_` and ends in `extension`. A file, a glob and a directory
/// read by any extension are left as they are.
fn visible_files(
    url: ListingTableUrl,
    table_path: &str,
    extension: &str,
) -> datafusion::error::Result<ListingTableUrl> {
    if !table_path.ends_with('/') || table_path.contains(['*', '?', '[']) || extension.is_empty() {
        return Ok(url);
    }
    let pattern = glob::Pattern::new(&format!("[!._]*{}", glob::Pattern::escape(extension)))
        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    ListingTableUrl::try_new(url.get_url().clone(), Some(pattern))
}

/// The local files under `table_path` (a file, a directory or a glob), sorted.
fn local_files(table_path: &str) -> Vec<std::path::PathBuf> {
    let pattern = if table_path.ends_with('/') {
        format!("{table_path}**/*")
    } else {
        table_path.to_string()
    };
    let Ok(paths) = glob::glob(&pattern) else {
        return Vec::new();
    };
    let mut files: Vec<_> = paths
        .flatten()
        .filter(|p| p.is_file() && !is_hidden(&p.display().to_string()))
        .collect();
    files.sort();
    files
}

/// Names the first local file under `table_path` that is not readable Parquet, so the error
/// says which file of a directory or glob is broken.
fn find_bad_parquet(table_path: &str) -> Option<String> {
    local_files(table_path).into_iter().find_map(|path| {
        let file = crate::access::open_local(&path).ok()?;
        match parquet::file::reader::SerializedFileReader::new(file) {
            Ok(_) => None,
            Err(e) => Some(format!(
                "{} is not a valid Parquet file: {e}",
                path.display()
            )),
        }
    })
}

/// Names the first local file and line under `table_path` that is not a JSON value
/// (newline-delimited JSON: one value per line, blank lines allowed).
fn find_bad_json(table_path: &str) -> Option<String> {
    use std::io::BufRead;
    local_files(table_path).into_iter().find_map(|path| {
        let file = crate::access::open_local(&path).ok()?;
        for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = match line {
                Ok(line) => line,
                Err(e) => return Some(format!("{} line {}: {e}", path.display(), index + 1)),
            };
            if line.trim().is_empty() {
                continue;
            }
            if let Err(e) = serde_json::from_str::<serde_json::Value>(&line) {
                // serde's message ends in its own position within the line; say it once.
                let message = e.to_string();
                let message = message
                    .rsplit_once(" at line ")
                    .map_or(message.as_str(), |(m, _)| m);
                return Some(format!(
                    "{} line {} column {}: not valid JSON: {message}",
                    path.display(),
                    index + 1,
                    e.column()
                ));
            }
        }
        None
    })
}

/// Names the first two local files under `table_path` whose values give one column two
/// different types (schema inference merges them and reports only the directory).
fn find_json_type_conflict(table_path: &str) -> Option<String> {
    let mut seen: Vec<(String, DataType, std::path::PathBuf)> = Vec::new();
    for path in local_files(table_path) {
        let file = crate::access::open_local(&path).ok()?;
        let (schema, _) =
            arrow::json::reader::infer_json_schema(std::io::BufReader::new(file), None).ok()?;
        for field in schema.fields() {
            match seen.iter().find(|(name, _, _)| name == field.name()) {
                Some((name, first, first_path)) if first != field.data_type() => {
                    return Some(format!(
                        "column `{name}` holds {first} values in {} but {} values in {}",
                        first_path.display(),
                        field.data_type(),
                        path.display()
                    ));
                }
                Some(_) => {}
                None => seen.push((
                    field.name().clone(),
                    field.data_type().clone(),
                    path.clone(),
                )),
            }
        }
    }
    None
}

/// A JSON column the contract declares an integer must hold whole numbers: the reader
/// truncates `1.7` into an integer column, silently. `inferred` is the type every record
/// gives the column; a fraction anywhere made it a float.
fn check_json_integers(
    source: &SourceSpec,
    location: &Location,
    table_path: &str,
    inferred: &Schema,
    contract: &[ColumnContract],
) -> Result<()> {
    for column in contract {
        let Ok(field) = inferred.field_with_name(&column.name) else {
            continue;
        };
        if !json_fraction_would_truncate(field.data_type(), &column.data_type) {
            continue;
        }
        let first = find_json_fraction(table_path, &column.name)
            .map(|at| format!(" ({at})"))
            .unwrap_or_default();
        return Err(contract_error(
            source,
            location,
            &column.name,
            format!(
                "the contract says `{}` but the data holds numbers with a fraction{first},                  which an integer column would truncate; declare it `double` or                  `decimal(p, s)`",
                column.declared
            ),
        ));
    }
    Ok(())
}

/// Whether JSON numbers inferred as `inferred` lose their fraction read as `declared`.
fn json_fraction_would_truncate(inferred: &DataType, declared: &DataType) -> bool {
    declared.is_integer() && inferred.is_floating()
}

/// The first local file and line under `table_path` whose `column` is a number with a
/// fraction, and the number.
fn find_json_fraction(table_path: &str, column: &str) -> Option<String> {
    use std::io::BufRead;
    local_files(table_path).into_iter().find_map(|path| {
        let file = crate::access::open_local(&path).ok()?;
        std::io::BufReader::new(file)
            .lines()
            .enumerate()
            .find_map(|(index, line)| {
                let value: serde_json::Value = serde_json::from_str(&line.ok()?).ok()?;
                let number = value.get(column)?.as_number()?;
                let whole = number.as_i64().is_some()
                    || number.as_u64().is_some()
                    || number.as_f64().is_some_and(|f| f.fract() == 0.0);
                (!whole).then(|| format!("{} line {}: {number}", path.display(), index + 1))
            })
    })
}

/// An exact-match pattern for a CSV `null_value`.
fn null_value_regex(value: &str) -> String {
    format!("^{}$", regex::escape(value))
}

/// Parquet carries its own types: every contract column must exist with a matching type.
fn check_contract(
    source: &SourceSpec,
    location: &Location,
    schema: &Schema,
    contract: &[ColumnContract],
) -> Result<()> {
    for column in contract {
        let field = find_field(source, location, schema, column)?;
        if !types_match(field.data_type(), &column.data_type) {
            return Err(contract_error(
                source,
                location,
                &column.name,
                format!(
                    "the contract says `{}` but the data has {}",
                    column.declared,
                    field.data_type()
                ),
            ));
        }
    }
    Ok(())
}

/// CSV and JSON are read with the contract's types for the columns it names.
fn apply_contract(
    source: &SourceSpec,
    location: &Location,
    inferred: &Schema,
    contract: &[ColumnContract],
) -> Result<Schema> {
    for column in contract {
        find_field(source, location, inferred, column)?;
    }
    let fields = inferred
        .fields()
        .iter()
        .map(
            |field| match contract.iter().find(|c| c.name == *field.name()) {
                Some(c) => Arc::new(Field::new(field.name(), c.data_type.clone(), true)),
                None => field.clone(),
            },
        )
        .collect::<Vec<_>>();
    Ok(Schema::new(fields))
}

fn find_field<'a>(
    source: &SourceSpec,
    location: &Location,
    schema: &'a Schema,
    column: &ColumnContract,
) -> Result<&'a Field> {
    schema
        .fields()
        .iter()
        .find(|f| f.name() == &column.name)
        .map(|f| f.as_ref())
        .ok_or_else(|| {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            contract_error(
                source,
                location,
                &column.name,
                format!(
                    "named in the contract but missing from the data; its columns are: {}",
                    names.join(", ")
                ),
            )
        })
}

fn contract_error(
    source: &SourceSpec,
    location: &Location,
    column: &str,
    message: String,
) -> CoreError {
    CoreError::Contract {
        source_name: source.name.clone(),
        location: location.to_string(),
        column: column.to_string(),
        message,
    }
}

/// Types are equal up to string encoding, timestamp unit and UTC spelling.
fn types_match(actual: &DataType, declared: &DataType) -> bool {
    fn canonical(t: &DataType) -> DataType {
        match t {
            DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
            DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
            DataType::Timestamp(_, None) => DataType::Timestamp(TimeUnit::Microsecond, None),
            DataType::Timestamp(_, Some(_)) => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
            other => other.clone(),
        }
    }
    canonical(actual) == canonical(declared)
}

/// Registers the table the SQL sees: the raw table, with `not null` columns checked.
async fn register_view(
    ctx: &SessionContext,
    source: &SourceSpec,
    raw_name: &str,
    schema: &Schema,
    contract: &[ColumnContract],
    _location: &Location,
) -> Result<()> {
    let raw = ctx.table_provider(raw_name).await?;
    let checks: Vec<(String, String)> = contract
        .iter()
        .filter(|c| !c.nullable && schema.column_with_name(&c.name).is_some())
        .map(|c| {
            (
                c.name.clone(),
                format!(
                    "source `{}`: column `{}` is declared `{}` but holds nulls",
                    source.name, c.name, c.declared
                ),
            )
        })
        .collect();
    if checks.is_empty() {
        ctx.register_table(source.name.as_str(), raw)?;
        return Ok(());
    }
    let checked = NotNullCheckedTable::new(raw, checks);
    ctx.register_table(source.name.as_str(), Arc::new(checked))?;
    Ok(())
}

/// A source whose `not null` contract columns are checked right above its scan
/// ([`NotNullCheckExec`]). The SQL sees the source's own columns (declared non-nullable), so
/// filters reach the scan, where Parquet statistics and row-group pruning use them.
#[derive(Debug)]
struct NotNullCheckedTable {
    inner: Arc<dyn TableProvider>,
    schema: SchemaRef,
    /// Column name and the error message for a null in it.
    checks: Vec<(String, String)>,
}

impl NotNullCheckedTable {
    fn new(inner: Arc<dyn TableProvider>, checks: Vec<(String, String)>) -> Self {
        let raw = inner.schema();
        let fields = raw
            .fields()
            .iter()
            .map(|f| {
                if checks.iter().any(|(name, _)| name == f.name()) {
                    Arc::new(f.as_ref().clone().with_nullable(false))
                } else {
                    f.clone()
                }
            })
            .collect::<Vec<_>>();
        NotNullCheckedTable {
            inner,
            schema: Arc::new(Schema::new_with_metadata(fields, raw.metadata().clone())),
            checks,
        }
    }
}

#[async_trait::async_trait]
impl TableProvider for NotNullCheckedTable {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    fn statistics(&self) -> Option<datafusion::common::Statistics> {
        self.inner.statistics()
    }

    /// Scans the checked columns whatever the query reads: `not null` is enforced on every
    /// row, also for `SELECT COUNT(*)` or a query of other columns (which, without them,
    /// read no checked column, and `COUNT(*)` was answered from the files' row counts). The
    /// check's node reports no statistics, so nothing is answered without the scan; the
    /// columns only the check reads are projected away above it.
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let scanned_columns = with_checked_columns(&wanted, &self.schema, &self.checks);
        let scan = self
            .inner
            .scan(state, Some(&scanned_columns), filters, limit)
            .await?;
        let checks = self
            .checks
            .iter()
            .map(|(column, message)| NotNullCheck {
                column: column.clone(),
                message: message.clone(),
            })
            .collect();
        let checked: Arc<dyn ExecutionPlan> = Arc::new(NotNullCheckExec::new(scan, checks));
        if scanned_columns.len() == wanted.len() {
            return Ok(checked);
        }
        let output = checked.schema();
        let exprs: Vec<(Arc<dyn datafusion::physical_expr::PhysicalExpr>, String)> = (0..wanted
            .len())
            .map(|i| {
                let name = output.field(i).name().clone();
                let column = datafusion::physical_expr::expressions::Column::new(&name, i);
                (Arc::new(column) as _, name)
            })
            .collect();
        Ok(Arc::new(
            datafusion::physical_plan::projection::ProjectionExec::try_new(exprs, checked)?,
        ))
    }
}

/// The columns to scan for a query of `wanted`: those, then the checked columns it lacks.
fn with_checked_columns(
    wanted: &[usize],
    schema: &Schema,
    checks: &[(String, String)],
) -> Vec<usize> {
    let mut columns = wanted.to_vec();
    for (name, _) in checks {
        if let Ok(i) = schema.index_of(name)
            && !columns.contains(&i)
        {
            columns.push(i);
        }
    }
    columns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_widths_and_float_precisions_widen_and_nothing_else_does() {
        use DataType::*;
        let merged = [
            (Int32, Int64, Int64),
            (Int64, Int8, Int64),
            (UInt8, UInt32, UInt32),
            (UInt32, Int64, Int64),
            (Int16, UInt8, Int16),
            (Float32, Float64, Float64),
            (Utf8, Utf8, Utf8),
            // A column with no value in one file (pyarrow's `null`, CSV's empty column).
            (Null, Int32, Int32),
            (Null, Utf8, Utf8),
        ];
        let refused = [
            (Int64, UInt64),
            (Int32, UInt32),
            (Int64, Float64),
            (Int32, Utf8),
            (Utf8, Utf8View),
            (Date32, Int32),
        ];
        assert_merges_either_way(widest_type, &merged, &refused);
    }

    /// That `widen` merges each pair of `merged` into its third type and refuses each pair
    /// of `refused`, whichever file comes first.
    fn assert_merges_either_way(
        widen: fn(&DataType, &DataType) -> Option<DataType>,
        merged: &[(DataType, DataType, DataType)],
        refused: &[(DataType, DataType)],
    ) {
        for (a, b, widest) in merged {
            assert_eq!(widen(a, b).as_ref(), Some(widest), "{a} {b}");
            assert_eq!(widen(b, a).as_ref(), Some(widest), "{b} {a}");
        }
        for (a, b) in refused {
            assert_eq!(widen(a, b), None, "{a} {b}");
            assert_eq!(widen(b, a), None, "{b} {a}");
        }
    }

    /// CSV inference types a column `bigint`, `double`, `date`, `timestamp`, `boolean` or
    /// text; only whole numbers and decimals widen (to `double`), as within one file.
    #[test]
    fn csv_whole_numbers_and_decimals_widen_to_double_and_nothing_else_does() {
        use DataType::*;
        let timestamp = Timestamp(TimeUnit::Second, None);
        let merged = [
            (Int64, Float64, Float64),
            (Int64, Int64, Int64),
            (Null, Float64, Float64),
        ];
        let refused = [
            (Int64, Utf8),
            (Float64, Utf8),
            (Date32, Utf8),
            (Date32, timestamp.clone()),
            (Int64, timestamp),
            (Boolean, Int64),
        ];
        assert_merges_either_way(widest_csv_type, &merged, &refused);
    }

    #[test]
    fn decimals_are_read_one_place_finer_with_the_same_whole_digits() {
        use DataType::*;
        let schema = Schema::new(vec![
            Field::new("amount", Decimal128(15, 2), false),
            Field::new("id", Int64, true),
            Field::new("whole", Decimal128(10, 0), true),
            Field::new("widest", Decimal128(38, 4), true),
        ]);
        let finer = decimals_one_place_finer(&schema).unwrap();
        let types: Vec<_> = finer
            .fields()
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        assert_eq!(
            types,
            [
                Decimal128(16, 3),
                Int64,
                Decimal128(11, 1),
                Decimal128(38, 4)
            ]
        );
        assert!(!finer.field(0).is_nullable());
        let none = Schema::new(vec![
            Field::new("id", Int64, true),
            Field::new("widest", Decimal128(38, 4), true),
        ]);
        assert_eq!(decimals_one_place_finer(&none), None);
    }

    #[test]
    fn a_leading_zero_is_a_zero_before_another_digit() {
        for zero in ["007", "00501", " -01", "+00", "\t0123", "\u{a0}09", "01x"] {
            assert!(has_leading_zero(zero), "{zero:?}");
        }
        for none in [
            "0", "-0", "0.5", "10", " 1", "", "+", "-", "0-1", "--01", "+-01", "x01", "1 01",
        ] {
            assert!(!has_leading_zero(none), "{none:?}");
        }
    }

    #[test]
    fn a_directory_is_read_by_its_files_and_key_value_directories_with_the_extension() {
        for read in ["a.csv", "/a.csv", "day=2024-01-01/a.csv", "k=1/n=2/a.csv"] {
            assert!(listing_reads(read, ".csv"), "{read}");
        }
        for skipped in [
            "x/y/deep.csv",
            "sub/a.csv",
            "A.CSV",
            "a.csv.gz",
            "k=1/sub/a.csv",
        ] {
            assert!(!listing_reads(skipped, ".csv"), "{skipped}");
        }
        assert!(listing_reads("A.CSV", ""));
    }

    #[test]
    fn a_header_naming_a_column_twice_or_not_at_all_is_refused() {
        let names = |text: &str| -> Vec<String> { text.split(',').map(String::from).collect() };
        assert_eq!(header_name_problem(&names("id,name,amount")), None);
        assert_eq!(
            header_name_problem(&names("id,name,id")).unwrap(),
            "columns 1 and 3 are both named `id`: give each column its own name"
        );
        // Only case differs: two columns, which the result check refuses if both are kept.
        assert_eq!(header_name_problem(&names("id,ID")), None);
        assert_eq!(
            header_name_problem(&names("id,name,")).unwrap(),
            "column 3 has no name (a delimiter at the end of the line?): name it, or remove the delimiter that makes it"
        );
        assert!(
            header_name_problem(&names("id, ,x"))
                .unwrap()
                .starts_with("column 2 has no name:")
        );
    }

    #[test]
    fn a_file_left_out_only_for_its_extensions_case_is_refused_naming_it() {
        for mismatched in ["FEB.CSV", "feb.Csv", "day=2024-01-01/MAR.CSV"] {
            assert!(
                differs_from_read_in_case_only(mismatched, ".csv"),
                "{mismatched}"
            );
        }
        for other in ["feb.csv", "sub/FEB.CSV", "notes.txt", "FEB.CSV.gz"] {
            assert!(!differs_from_read_in_case_only(other, ".csv"), "{other}");
        }
        assert!(!differs_from_read_in_case_only("FEB.CSV", ""));
        let mut found = FoundFiles::default();
        for name in ["jan.csv", "/FEB.CSV", "readme.txt"] {
            found.note_case_mismatch(name, ".csv");
        }
        let location = Location::parse("/data/sales/", Path::new("/")).unwrap();
        let err = check_case_mismatched(&found, &location, ".csv").unwrap_err();
        assert!(
            err.contains("/data/sales holds FEB.CSV ending in `.csv` but for case")
                && err.contains("rename it"),
            "{err}"
        );
        assert!(check_case_mismatched(&FoundFiles::default(), &location, ".csv").is_ok());
    }

    #[test]
    fn the_checked_columns_are_scanned_whatever_the_query_reads() {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]);
        let checks = vec![("id".to_string(), "id holds nulls".to_string())];
        assert_eq!(with_checked_columns(&[1], &schema, &checks), [1, 0]);
        assert_eq!(with_checked_columns(&[], &schema, &checks), [0]);
        assert_eq!(with_checked_columns(&[0, 1], &schema, &checks), [0, 1]);
    }

    /// `SELECT COUNT(*)` and a query of other columns reach the check too.
    #[tokio::test]
    async fn a_null_in_a_not_null_column_fails_queries_that_do_not_read_it() {
        use datafusion::arrow::array::{Int64Array, StringArray};
        use datafusion::arrow::record_batch::RecordBatch;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("v", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![Some(1), None, Some(3)])),
                Arc::new(StringArray::from(vec!["a", "b", "c"])),
            ],
        )
        .unwrap();
        let raw = Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap());
        let checks = vec![(
            "id".to_string(),
            "source `src`: column `id` holds nulls".to_string(),
        )];
        let ctx = SessionContext::new();
        ctx.register_table("src", Arc::new(NotNullCheckedTable::new(raw, checks)))
            .unwrap();
        for sql in [
            "SELECT COUNT(*) FROM src",
            "SELECT v FROM src",
            "SELECT COUNT(v) FROM src",
            "SELECT * FROM src",
        ] {
            let result = ctx.sql(sql).await.unwrap().collect().await;
            let err = result
                .err()
                .unwrap_or_else(|| panic!("{sql} passed"))
                .to_string();
            assert!(err.contains("column `id` holds nulls"), "{sql}: {err}");
        }
    }

    /// A session with the CSV source `src` at `location` (`extra`: more of its TOML, such as
    /// options or a contract) registered as a job registers it, or the error it gives.
    async fn with_csv_source(
        dir: &Path,
        location: &str,
        extra: &str,
    ) -> std::result::Result<SessionContext, String> {
        with_source(dir, "csv", location, extra).await
    }

    /// The rows of `sql` in `ctx`, as a table.
    async fn shown(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
    }

    /// A session with the source `src` of `format` at `location` (`extra` as above).
    async fn with_source(
        dir: &Path,
        format: &str,
        location: &str,
        extra: &str,
    ) -> std::result::Result<SessionContext, String> {
        let text = format!(
            "[pipeline]\nname = \"p\"\n[[source]]\nname = \"src\"\nformat = \"{format}\"\nlocation = \"{}/{location}\"\n{extra}[transform]\nsql = \"SELECT * FROM src\"\n[target]\ntable = \"t.t\"\n",
            dir.display()
        );
        let spec =
            nightshift_spec::resolve_spec_text(&text, Path::new("p.toml"), dir, &[]).unwrap();
        let ctx = crate::session::new_session(crate::session::SessionOptions::default());
        register_sources(&ctx, &spec, None)
            .await
            .map_err(|e| e.to_string())?;
        Ok(ctx)
    }

    /// Inference samples the first thousand rows; a column empty in all of them keeps the
    /// values that come later (they were read as NULL).
    #[tokio::test]
    async fn a_csv_column_empty_in_the_rows_inference_samples_keeps_its_later_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut csv = String::from("id,note,amt\n");
        for id in 1..=1500 {
            let (note, amt) = match id {
                1400 => ("hello", ""),
                1450 => ("", "12.5"),
                _ => ("", ""),
            };
            csv.push_str(&format!("{id},{note},{amt}\n"));
        }
        std::fs::write(dir.path().join("a.csv"), csv).unwrap();
        let ctx = with_csv_source(dir.path(), "a.csv", "").await.unwrap();
        let shown = shown(&ctx, "SELECT id, note, CAST(amt AS DOUBLE) AS amt FROM src WHERE note IS NOT NULL OR amt IS NOT NULL ORDER BY id").await;
        assert!(
            shown.contains("| 1400 | hello |      |") && shown.contains("| 1450 |       | 12.5 |"),
            "{shown}"
        );
        let header_and_rows = shown.lines().filter(|l| l.starts_with("| ")).count();
        assert_eq!(header_and_rows, 1 + 2, "{shown}");
    }

    #[test]
    fn a_job_whose_incremental_sources_hold_nothing_new_has_nothing_to_do() {
        let source = |incremental: bool, nothing_new: bool| SourceSummary {
            name: "s".into(),
            format: SourceFormat::Iceberg,
            location: String::new(),
            files: 0,
            bytes: 0,
            schema: Arc::new(Schema::empty()),
            snapshot_id: Some(1),
            consumed: incremental.then(|| crate::incremental::Consumption {
                table: "raw.events".into(),
                after: Some(1),
                upto: 1,
            }),
            read: None,
            nothing_new,
        };
        assert!(nothing_new_upstream(&[
            source(true, true),
            source(false, false)
        ]));
        assert!(!nothing_new_upstream(&[
            source(true, true),
            source(true, false)
        ]));
        assert!(!nothing_new_upstream(&[source(false, false)]));
        assert!(!nothing_new_upstream(&[]));
    }

    /// A directory whose files infer other types (whole amounts one night, fractions the
    /// next) is read as the contract declares; a bad value is named by the reader.
    #[tokio::test]
    async fn a_csv_directory_is_read_as_its_contract_declares() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/a.csv"), "id,amount\n1,10\n2,20\n").unwrap();
        std::fs::write(dir.path().join("d/b.csv"), "id,amount\n3,10.5\n").unwrap();
        let contract = "[source.schema]\nid = \"bigint\"\namount = \"double\"\n";
        let ctx = with_csv_source(dir.path(), "d/", contract).await.unwrap();
        let total = shown(&ctx, "SELECT sum(amount) AS total FROM src").await;
        assert!(total.contains("| 40.5  |"), "{total}");
        std::fs::write(dir.path().join("d/b.csv"), "id,amount\n3,10.5\n4,abc\n").unwrap();
        let ctx = with_csv_source(dir.path(), "d/", contract).await.unwrap();
        let err = ctx
            .sql("SELECT sum(amount) FROM src")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap_err()
            .to_string();
        // The value and its type (a job's task adds the file).
        assert!(err.contains("'abc' as type 'Float64'"), "{err}");
    }

    /// A value with more places than its `decimal(p, s)` contract is rounded, half away from
    /// zero, as a SQL `CAST` rounds it (the reader truncated: 1.239 was published as 1.23);
    /// too many whole digits still fail in the reader, naming the value.
    #[tokio::test]
    async fn a_csv_decimal_with_more_places_than_its_contract_is_rounded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.csv"),
            "id,amount\n1,1.239\n2,-1.235\n3,-1.2349\n4,7\n",
        )
        .unwrap();
        let contract = "[source.schema]\nid = \"bigint\"\namount = \"decimal(10, 2)\"\n";
        let ctx = with_csv_source(dir.path(), "a.csv", contract)
            .await
            .unwrap();
        let rows = shown(&ctx, "SELECT id, amount FROM src ORDER BY id").await;
        for row in [
            "| 1  | 1.24   |",
            "| 2  | -1.24  |",
            "| 3  | -1.23  |",
            "| 4  | 7.00   |",
        ] {
            assert!(rows.contains(row), "{row} in {rows}");
        }
        let typed = shown(&ctx, "SELECT arrow_typeof(amount) AS t FROM src LIMIT 1").await;
        assert!(typed.contains("Decimal128(10, 2)"), "{typed}");
        // Rounded past the declared precision: the cast names the value it would make.
        let failed = |csv: &'static str| {
            std::fs::write(dir.path().join("a.csv"), csv).unwrap();
            async {
                let ctx = with_csv_source(dir.path(), "a.csv", contract)
                    .await
                    .unwrap();
                let read = ctx.sql("SELECT amount FROM src").await.unwrap().collect();
                read.await.unwrap_err().to_string()
            }
        };
        let err = failed("id,amount\n1,1.5\n5,99999999.995\n").await;
        assert!(err.contains("100000000.00 is too large"), "{err}");
        // Too many whole digits: the reader's error, naming the value (a job's task adds
        // the file).
        let err = failed("id,amount\n1,1.5\n2,123456789.5\n").await;
        assert!(
            err.contains("parse decimal overflow (123456789.5)"),
            "{err}"
        );
    }

    /// Without a contract, a directory of whole amounts one night and `10.5` the next is read
    /// as `double` (it was refused with "Fail to merge schema", naming no file); a file whose
    /// amounts are text is refused naming the column and both files.
    #[tokio::test]
    async fn a_csv_directory_of_whole_and_decimal_amounts_is_read_as_double() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/a.csv"), "id,amount\n1,10\n2,20\n").unwrap();
        std::fs::write(dir.path().join("d/b.csv"), "id,amount\n3,10.5\n").unwrap();
        let ctx = with_csv_source(dir.path(), "d/", "").await.unwrap();
        let total = shown(
            &ctx,
            "SELECT sum(amount) AS total, arrow_typeof(max(amount)) AS t, sum(id) AS ids FROM src",
        )
        .await;
        assert!(total.contains("| 40.5  | Float64 | 6   |"), "{total}");
        std::fs::write(dir.path().join("d/c.csv"), "id,amount\n4,n/a\n").unwrap();
        let Err(err) = with_csv_source(dir.path(), "d/", "").await else {
            panic!("text and numbers in one column were read");
        };
        assert!(
            err.contains("column `amount` is Float64 in ")
                && err.contains("b.csv but Utf8 in ")
                && err.contains("c.csv"),
            "{err}"
        );
    }

    /// An integer column with a leading zero anywhere (past the rows inference samples) is
    /// text, as DuckDB reads it; one without, or one the contract types, stays an integer.
    #[tokio::test]
    async fn a_csv_column_with_leading_zeros_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut csv = String::from("zip,id,n\n");
        for row in 1..=1500 {
            let zip = if row == 1450 {
                "00501".to_string()
            } else {
                (10000 + row).to_string()
            };
            csv.push_str(&format!("{zip},{row:03},{row}\n"));
        }
        std::fs::write(dir.path().join("a.csv"), csv).unwrap();
        let ctx = with_csv_source(dir.path(), "a.csv", "").await.unwrap();
        let rows = shown(
            &ctx,
            "SELECT zip, id, n FROM src WHERE n IN (7, 1450) ORDER BY n",
        )
        .await;
        assert!(
            rows.contains("| 10007 | 007  | 7    |") && rows.contains("| 00501 | 1450 | 1450 |"),
            "{rows}"
        );
        let typed = shown(
            &ctx,
            "SELECT arrow_typeof(zip), arrow_typeof(id), arrow_typeof(n) FROM src LIMIT 1",
        )
        .await;
        assert!(
            typed.contains("| Utf8 ") && typed.contains("| Int64 "),
            "{typed}"
        );
        // A contract's integer is the user's word.
        let ctx = with_csv_source(dir.path(), "a.csv", "[source.schema]\nid = \"bigint\"\n")
            .await
            .unwrap();
        let rows = shown(&ctx, "SELECT id FROM src WHERE n = 7").await;
        assert!(rows.contains("| 7  |"), "{rows}");
    }

    /// What inspecting a source's files decided is remembered for those versions of the
    /// files, and they are inspected again once they change. The middle step proves the
    /// remembering: a rewrite that restores the file's modification time (same inode, same
    /// size) is one its store could not tell either, and the type decided before stays.
    #[tokio::test]
    async fn a_csv_source_is_inspected_again_when_its_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.csv");
        let type_of_id = async |dir: &Path| {
            let ctx = with_csv_source(dir, "a.csv", "").await.unwrap();
            shown(
                &ctx,
                "SELECT arrow_typeof(id) AS t, id FROM src ORDER BY id LIMIT 1",
            )
            .await
        };
        std::fs::write(&path, "id\n17\n25\n").unwrap();
        let first = type_of_id(dir.path()).await;
        assert!(first.contains("| Int64 | 17 |"), "{first}");

        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, "id\n17\n05\n").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(modified).unwrap();
        drop(file);
        let unseen = type_of_id(dir.path()).await;
        assert!(unseen.contains("| Int64 | 5  |"), "{unseen}");

        std::thread::sleep(std::time::Duration::from_millis(5));
        std::fs::write(&path, "id\n17\n05\n").unwrap();
        let seen = type_of_id(dir.path()).await;
        assert!(seen.contains("| Utf8 | 05 |"), "{seen}");
    }

    /// One instant, 2024-03-02 03:00 UTC, in a Parquet column annotated New York time: the
    /// date, day and hour the SQL derives from it are UTC's, as the table stores it (they
    /// were New York's: 2024-03-01 and hour 22).
    #[tokio::test]
    async fn a_zoned_parquet_timestamp_is_computed_in_utc() {
        use datafusion::arrow::array::TimestampMicrosecondArray;
        use datafusion::arrow::record_batch::RecordBatch;
        assert!(is_utc("+00:00") && !is_utc("America/New_York") && !is_utc("+01:00"));
        let dir = tempfile::tempdir().unwrap();
        let instant = 1_709_348_400_000_000_i64; // 2024-03-02T03:00:00Z
        let zoned =
            TimestampMicrosecondArray::from(vec![instant]).with_timezone("America/New_York");
        let schema = Arc::new(Schema::new(vec![Field::new(
            "t",
            datafusion::arrow::array::Array::data_type(&zoned).clone(),
            true,
        )]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(zoned)]).unwrap();
        let file = std::fs::File::create(dir.path().join("a.parquet")).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let ctx = with_source(dir.path(), "parquet", "a.parquet", "")
            .await
            .unwrap();
        let shown = shown(
            &ctx,
            "SELECT CAST(CAST(t AS DATE) AS VARCHAR) AS d, CAST(extract(hour FROM t) AS INT) AS h, \
                  CAST(t AS VARCHAR) AS v FROM src",
        )
        .await;
        assert!(
            shown.contains("2024-03-02") && shown.contains("| 3 "),
            "{shown}"
        );
        assert!(shown.contains("03:00:00"), "the instant is kept: {shown}");
    }

    /// A Parquet directory written by two engines: `n` as INT32 one night and INT64 the
    /// next, `x` as float and double. Read as the widest (it was refused, naming no file);
    /// a column that is text in one file and a number in the other is refused naming both.
    #[tokio::test]
    async fn a_parquet_directory_of_int32_and_int64_files_is_read_as_int64() {
        use datafusion::arrow::array::{
            ArrayRef, Float32Array, Float64Array, Int32Array, Int64Array, StringArray,
        };
        use datafusion::arrow::record_batch::RecordBatch;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let write = |name: &str, columns: Vec<(&str, ArrayRef)>| {
            let batch = RecordBatch::try_from_iter(columns).unwrap();
            let file = std::fs::File::create(dir.path().join("d").join(name)).unwrap();
            let mut writer =
                parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
            writer.write(&batch).unwrap();
            writer.close().unwrap();
        };
        write(
            "night-1.parquet",
            vec![
                ("n", Arc::new(Int32Array::from(vec![1, 2])) as ArrayRef),
                (
                    "x",
                    Arc::new(Float32Array::from(vec![0.5, 1.5])) as ArrayRef,
                ),
            ],
        );
        write(
            "night-2.parquet",
            vec![
                (
                    "n",
                    Arc::new(Int64Array::from(vec![5_000_000_000])) as ArrayRef,
                ),
                ("x", Arc::new(Float64Array::from(vec![2.25])) as ArrayRef),
            ],
        );
        let ctx = with_source(dir.path(), "parquet", "d/", "").await.unwrap();
        let rows = shown(
            &ctx,
            "SELECT SUM(n) AS n, SUM(x) AS x, arrow_typeof(MAX(n)) AS t FROM src",
        )
        .await;
        assert!(rows.contains("| 5000000003 | 4.25 | Int64 |"), "{rows}");
        write(
            "night-3.parquet",
            vec![("n", Arc::new(StringArray::from(vec!["seven"])) as ArrayRef)],
        );
        let Err(err) = with_source(dir.path(), "parquet", "d/", "").await else {
            panic!("text and integers in one column were read");
        };
        assert!(
            err.contains("column `n` is Int64 in ")
                && err.contains("night-2.parquet but Utf8")
                && err.contains("night-3.parquet"),
            "{err}"
        );
    }

    /// Whole prices for 1,500 records, then `19.99`; a key first seen at record 1,200.
    fn json_with_a_late_fraction(dir: &Path) {
        let mut json = String::new();
        for id in 1..=1500 {
            let price = if id == 1400 {
                "19.99".to_string()
            } else {
                id.to_string()
            };
            let note = if id == 1200 {
                ", \"note\": \"late\""
            } else {
                ""
            };
            json.push_str(&format!("{{\"id\": {id}, \"price\": {price}{note}}}\n"));
        }
        std::fs::write(dir.join("a.json"), json).unwrap();
    }

    /// JSON types come from every record: a fraction after the first thousand was read
    /// truncated (`19`) into a column inferred bigint, and a late key was dropped.
    #[tokio::test]
    async fn json_types_are_inferred_from_every_record() {
        let dir = tempfile::tempdir().unwrap();
        json_with_a_late_fraction(dir.path());
        let ctx = with_source(dir.path(), "json", "a.json", "").await.unwrap();
        let shown = shown(&ctx, "SELECT CAST(price AS VARCHAR) AS p, note FROM src WHERE id IN (1200, 1400) ORDER BY id").await;
        assert!(shown.contains("19.99"), "{shown}");
        assert!(shown.contains("late"), "{shown}");
    }

    /// A contract `int` over JSON numbers with a fraction fails naming the file, line and
    /// number; whole numbers written `1e3` are integers.
    #[tokio::test]
    async fn a_json_fraction_under_an_integer_contract_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        json_with_a_late_fraction(dir.path());
        let contract = "[source.schema]\nprice = \"bigint\"\n";
        let err = with_source(dir.path(), "json", "a.json", contract)
            .await
            .err()
            .expect("a fraction under an integer contract");
        assert!(err.contains("price"), "{err}");
        assert!(err.contains("a.json line 1400: 19.99"), "{err}");
        assert!(json_fraction_would_truncate(
            &DataType::Float64,
            &DataType::Int32
        ));
        assert!(!json_fraction_would_truncate(
            &DataType::Int64,
            &DataType::Int32
        ));
        assert!(!json_fraction_would_truncate(
            &DataType::Float64,
            &DataType::Decimal128(10, 2)
        ));
        std::fs::write(
            dir.path().join("a.json"),
            "{\"id\": 1, \"price\": 7}\n{\"id\": 2, \"price\": 8}\n",
        )
        .unwrap();
        let ctx = with_source(dir.path(), "json", "a.json", contract)
            .await
            .unwrap();
        let shown = shown(&ctx, "SELECT SUM(price) FROM src").await;
        assert!(shown.contains("15"), "{shown}");
    }

    /// `null_value` is read as NULL in every column, also one its values typed as a number.
    #[tokio::test]
    async fn a_csv_null_value_is_read_as_null() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.csv"),
            "id,name,n\n1,NA,NA\n2,x,5\n3,\"NA\",7\n",
        )
        .unwrap();
        for contract in ["", "[source.schema]\nn = \"int\"\n"] {
            let extra = format!("options = {{ null_value = \"NA\" }}\n{contract}");
            let ctx = with_csv_source(dir.path(), "a.csv", &extra).await.unwrap();
            let frame = ctx
                .sql("SELECT id, name, n, n + 1 AS next FROM src ORDER BY id")
                .await
                .unwrap();
            let batches = frame.collect().await.unwrap();
            let shown = arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string();
            assert!(
                shown.contains("| 1  |      |   |      |")
                    && shown.contains("| 2  | x    | 5 | 6    |")
                    && shown.contains("| 3  |      | 7 | 8    |"),
                "{contract}\n{shown}"
            );
        }
    }

    /// Files of one CSV source whose headers name other columns, or the same in another
    /// order, are refused by name (the second was read by position into the first's
    /// columns); quoting, a byte order mark and line ends do not make a header differ.
    #[tokio::test]
    async fn csv_files_whose_headers_differ_are_refused_naming_both() {
        let register = |files: Vec<(&'static str, &'static str)>| async move {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("in")).unwrap();
            for (name, text) in files {
                std::fs::write(dir.path().join("in").join(name), text).unwrap();
            }
            with_csv_source(dir.path(), "in/", "").await.map(|_| ())
        };
        let error = register(vec![
            ("a.csv", "id,qty,price\n1,5,100\n"),
            ("b.csv", "price,qty,id\n300,7,3\n"),
        ])
        .await
        .unwrap_err();
        assert!(
            error.contains("b.csv names its columns `price,qty,id`")
                && error.contains("a.csv names them `id,qty,price`"),
            "{error}"
        );
        assert!(
            register(vec![
                ("a.csv", "id,qty,price\n1,5,100\n"),
                ("b.csv", "id,qty\n1,5\n"),
            ])
            .await
            .is_err()
        );
        register(vec![
            ("a.csv", "id,qty,price\n1,5,100\n"),
            ("b.csv", "\u{feff}\"id\",qty,price\r\n2,6,200\r\n"),
            ("c.csv", "id,qty,price"),
        ])
        .await
        .unwrap();
    }

    #[test]
    fn a_directorys_hidden_files_are_not_read() {
        use datafusion::datasource::listing::ListingTableUrl;
        use object_store::path::Path as ObjectPath;
        for dir in ["/data/sales/", "s3://bucket/sales/"] {
            let url = ListingTableUrl::parse(dir).unwrap();
            let url = visible_files(url, dir, ".csv").unwrap();
            let prefix = dir
                .trim_start_matches("s3://bucket")
                .trim_start_matches('/');
            let reads =
                |file: &str| url.contains(&ObjectPath::from(format!("{prefix}{file}")), true);
            assert!(
                reads("a.csv") && reads("day=1/b.csv") && reads("é ü.csv"),
                "{dir}"
            );
            for hidden in [
                ".a.csv",
                "_tmp.csv",
                "day=1/.b.csv",
                "sub/c.csv",
                "a.csv.tmp",
            ] {
                assert!(!reads(hidden), "{dir} {hidden}");
            }
        }
        // A glob or one file stays as written.
        let glob = ListingTableUrl::parse("/data/_x*.csv").unwrap();
        let kept = visible_files(glob.clone(), "/data/_x*.csv", ".csv").unwrap();
        assert_eq!(kept, glob);
    }

    #[test]
    fn a_wildcard_in_a_directory_is_refused_by_name() {
        assert!(check_glob("/data/lineitem/*.csv").is_ok());
        assert!(check_glob("/data/part-?.parquet").is_ok());
        for bad in [
            "/data/*/big.csv",
            "/data/m*/p.parquet",
            "/data/**/p.parquet",
        ] {
            let err = check_glob(bad).unwrap_err().to_string();
            assert!(
                err.contains("only be in the file name") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn no_files_names_what_is_there_and_not_read() {
        let at = Location::parse("/d/", Path::new("/")).unwrap();
        let message = no_files_message(&at, "d/", ".csv", &["A.CSV".to_string()]);
        assert!(
            message.contains("not ending in `.csv`") && message.contains("A.CSV"),
            "{message}"
        );
        assert!(!no_files_message(&at, "d/", ".csv", &[]).contains("not read"));
    }
}
