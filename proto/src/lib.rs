//! Protobuf messages exchanged between the coordinator and the workers.
//!
//! The `.proto` files live in `proto/nightshift/v1/`; this crate only compiles them.

/// Version of the task protocol. A worker refuses a task that carries another one.
pub const PROTOCOL_VERSION: u32 = 2;

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/nightshift_descriptor.bin"));

/// Generated code for `nightshift.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/nightshift.v1.rs"));
}
