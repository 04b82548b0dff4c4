//! Opening the Iceberg catalog.

use std::sync::Arc;

use iceberg::{Catalog, CatalogBuilder};
use iceberg_catalog_rest::{
    REST_CATALOG_PROP_URI, REST_CATALOG_PROP_WAREHOUSE, RestCatalogBuilder,
};
use iceberg_catalog_sql::{SqlBindStyle, SqlCatalogBuilder};

use crate::error::{CoreError, Result};
use crate::storage::{Location, iceberg_props, iceberg_storage_factory};

/// Catalog name used for the embedded SQLite catalog; PyIceberg's `SqlCatalog` must be opened
/// with the same name to see the tables.
pub const DEFAULT_CATALOG_NAME: &str = "nightshift";

/// Which catalog holds the tables.
#[derive(Debug, Clone)]
pub enum CatalogConfig {
    /// An Iceberg SQL catalog (SQLite file or PostgreSQL URL).
    Sql {
        name: String,
        uri: String,
        warehouse: Location,
    },
    /// An Iceberg REST catalog.
    Rest {
        name: String,
        uri: String,
        /// The catalog's `warehouse` property (a location or a name, per server).
        warehouse: String,
        /// OAuth2 client credentials `client_id:client_secret`, if the catalog wants them.
        credential: Option<Secret>,
    },
}

/// A secret string: `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl CatalogConfig {
    /// The embedded default: SQLite at `<warehouse>/catalog.db`.
    pub fn embedded(warehouse: &Location) -> Result<Self> {
        let dir = warehouse.local_path().ok_or_else(|| {
            CoreError::io(
                format!("the embedded catalog needs a local warehouse, got {warehouse}"),
                std::io::ErrorKind::InvalidInput.into(),
            )
        })?;
        Ok(CatalogConfig::Sql {
            name: DEFAULT_CATALOG_NAME.to_string(),
            uri: format!("sqlite:{}?mode=rwc", dir.join("catalog.db").display()),
            warehouse: warehouse.clone(),
        })
    }
}

/// Opens the catalog and finds `table` (`namespace.table`) in it, for commands that work on
/// a table that must exist already; an error names the table otherwise.
pub async fn open_existing_table(
    config: &CatalogConfig,
    table: &str,
) -> Result<(Arc<dyn Catalog>, iceberg::TableIdent)> {
    let ident = super::parse_table_ident(table)?;
    let catalog = open_catalog(config).await?;
    if !catalog.table_exists(&ident).await? {
        return Err(CoreError::Target {
            table: table.to_string(),
            message: "no such table in the catalog".into(),
        });
    }
    Ok((catalog, ident))
}

/// The table `ident` in `catalog`, or `None` when there is no such table.
pub async fn load_if_exists(
    catalog: &dyn Catalog,
    ident: &iceberg::TableIdent,
) -> Result<Option<iceberg::table::Table>> {
    if !catalog.table_exists(ident).await? {
        return Ok(None);
    }
    Ok(Some(catalog.load_table(ident).await?))
}

/// Opens the catalog, creating the SQLite file and the catalog tables if needed.
pub async fn open_catalog(config: &CatalogConfig) -> Result<Arc<dyn Catalog>> {
    match config {
        CatalogConfig::Sql {
            name,
            uri,
            warehouse,
        } => {
            if let Some(dir) = warehouse.local_path() {
                std::fs::create_dir_all(&dir).map_err(|e| {
                    CoreError::io(
                        format!("cannot create warehouse directory {}", dir.display()),
                        e,
                    )
                })?;
            }
            let bind_style = if uri.starts_with("sqlite:") {
                SqlBindStyle::QMark
            } else {
                SqlBindStyle::DollarNumeric
            };
            let warehouse = warehouse.to_iceberg_string();
            let catalog = SqlCatalogBuilder::default()
                .uri(uri.clone())
                .warehouse_location(warehouse.clone())
                .sql_bind_style(bind_style)
                .with_storage_factory(iceberg_storage_factory(&warehouse))
                .load(name.clone(), iceberg_props())
                .await
                .map_err(|e| {
                    CoreError::io(
                        format!("cannot open catalog {uri}: {e}"),
                        std::io::ErrorKind::Other.into(),
                    )
                })?;
            Ok(Arc::new(catalog))
        }
        CatalogConfig::Rest {
            name,
            uri,
            warehouse,
            credential,
        } => {
            let mut props = iceberg_props();
            props.insert(REST_CATALOG_PROP_URI.to_string(), uri.clone());
            props.insert(REST_CATALOG_PROP_WAREHOUSE.to_string(), warehouse.clone());
            if let Some(Secret(credential)) = credential {
                props.insert("credential".to_string(), credential.clone());
            }
            let catalog = RestCatalogBuilder::default()
                .with_storage_factory(iceberg_storage_factory(warehouse))
                .load(name.clone(), props)
                .await
                .map_err(|e| {
                    CoreError::io(
                        format!("cannot open REST catalog {uri}: {e}"),
                        std::io::ErrorKind::Other.into(),
                    )
                })?;
            Ok(Arc::new(catalog))
        }
    }
}
