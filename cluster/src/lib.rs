//! The cluster's transports and configuration.
//!
//! - [`admin`]: the admin endpoint (`/metrics`, `/healthz`, `/readyz`) of the cluster processes.
//! - [`config`]: the cluster configuration file with environment overrides.
//! - [`poll`]: how often a waiter reads a job's state again.
//! - [`rabbitmq`]: the [`TaskQueue`](nightshift_core::transport::TaskQueue) on RabbitMQ
//!   (durable quorum queues, publisher confirms, manual acks, delivery limit, dead letters,
//!   reconnection).
//! - [`redis_state`]: the [`StateStore`](nightshift_core::transport::StateStore) on Redis.
//! - [`submission`]: the job-submission message the coordinator consumes.

pub mod admin;
pub mod config;
pub mod poll;
pub mod rabbitmq;
pub mod redis_state;
pub mod submission;

pub use config::ClusterConfig;
pub use rabbitmq::{DeadFate, DeadTask, RabbitQueue};
pub use redis_state::RedisState;
