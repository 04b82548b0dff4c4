//! The engine's error type. Variants carry the source, file and column a user needs.

use datafusion::error::DataFusionError;

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Spec(#[from] nightshift_spec::SpecError),

    /// A source location that matches no file.
    #[error("source `{source_name}`: {message}")]
    Source {
        source_name: String,
        message: String,
    },

    /// The data does not honour the source's `[source.schema]` contract.
    #[error("source `{source_name}` ({location}): column `{column}`: {message}")]
    Contract {
        source_name: String,
        location: String,
        column: String,
        message: String,
    },

    /// The spec reaches outside the coordinator's allowed locations or tables.
    #[error("not allowed: {0}")]
    Access(#[from] crate::access::AccessError),

    /// The transform SQL does not plan.
    #[error("transform SQL: {0}")]
    Sql(String),

    /// The result does not fit the target table or its partition spec.
    #[error("target `{table}`: {message}")]
    Target { table: String, message: String },

    /// A task failed; `retryable` tells whether running it again may help.
    #[error("{message}")]
    Task { message: String, retryable: bool },

    #[error("iceberg: {0}")]
    Iceberg(#[from] iceberg::Error),

    /// The catalog refused or failed a request Nightshift made itself (not through
    /// iceberg-rust), e.g. a REST commit.
    #[error("catalog: {0}")]
    Catalog(String),

    #[error(transparent)]
    DataFusion(#[from] DataFusionError),

    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),

    #[error("ballista planner: {0}")]
    Ballista(#[from] ballista_core::error::BallistaError),

    #[error("transport: {0}")]
    Transport(String),

    /// The broker took the message but no queue did (a `mandatory` publish returned): for a
    /// task result, the job's result queue is gone because the job has ended.
    #[error("transport: no queue named {queue} took the message")]
    Unroutable { queue: String },

    /// The broker refused a message (a negative confirm): nothing was enqueued, e.g. by a
    /// quorum queue declared a moment before, still electing its leader.
    #[error("transport: rabbitmq refused a message for {queue}")]
    Refused { queue: String },

    #[error("protocol: {0}")]
    Protocol(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CoreError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CoreError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether running the same task again may succeed: I/O and object-store errors are
    /// retryable; errors in the data, the SQL or the spec are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            CoreError::Task { retryable, .. } => *retryable,
            CoreError::ObjectStore(_)
            | CoreError::Io { .. }
            | CoreError::Transport(_)
            | CoreError::Refused { .. } => true,
            CoreError::DataFusion(e) => datafusion_error_is_retryable(e),
            CoreError::Iceberg(e) => e.retryable(),
            _ => false,
        }
    }
}

/// Looks through DataFusion's wrappers for an I/O or object-store cause. Ballista 53 does
/// not unwrap these (fixed upstream later), so Nightshift classifies errors itself.
pub fn datafusion_error_is_retryable(err: &DataFusionError) -> bool {
    match err {
        DataFusionError::IoError(_) | DataFusionError::ObjectStore(_) => true,
        DataFusionError::Context(_, inner) => datafusion_error_is_retryable(inner),
        DataFusionError::Shared(inner) => datafusion_error_is_retryable(inner),
        DataFusionError::External(inner) => {
            if let Some(e) = inner.downcast_ref::<DataFusionError>() {
                datafusion_error_is_retryable(e)
            } else if let Some(e) = inner.downcast_ref::<CoreError>() {
                e.is_retryable()
            } else {
                inner.downcast_ref::<object_store::Error>().is_some()
                    || inner.downcast_ref::<std::io::Error>().is_some()
            }
        }
        _ => false,
    }
}
