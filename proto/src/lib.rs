//! Sightline's gRPC contracts: the generated messages, clients and servers of every
//! `sightline.<service>.v1` package, and the encoded descriptor set that server reflection serves.
//!
//! The module tree mirrors the package tree, so `sightline.linker.v1.LinkerService` is
//! [`linker::v1::linker_service_server::LinkerService`].

// Generated code is exempt from the workspace lints.
#![allow(unreachable_pub, missing_debug_implementations, clippy::all)]

pub mod classes;
pub mod rules;

pub use prost;
pub use prost_types;
pub use tonic;

/// The encoded `FileDescriptorSet` of every Sightline proto file, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sightline_descriptor.bin"));

pub mod common {
    pub mod v1 {
        tonic::include_proto!("sightline.common.v1");
    }
}

pub mod audit {
    pub mod v1 {
        tonic::include_proto!("sightline.audit.v1");
    }
}

pub mod linker {
    pub mod v1 {
        tonic::include_proto!("sightline.linker.v1");
    }
}

pub mod consent {
    pub mod v1 {
        tonic::include_proto!("sightline.consent.v1");
    }
}

pub mod collector {
    pub mod v1 {
        tonic::include_proto!("sightline.collector.v1");
    }
}

pub mod insights {
    pub mod v1 {
        tonic::include_proto!("sightline.insights.v1");
    }
}
