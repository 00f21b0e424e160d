//! Pipeline stage: export. Fans finished flows and loss notices out to gRPC
//! subscribers (`sockscope.v1.FlowService`), answers status and health, and
//! renders flows as ECS documents.
//!
//! Daemon wiring: create the channel with [`hub::pipeline_channel`], give
//! the [`hub::PipelineSender`] to the pipeline, then [`server::bind`] and
//! [`server::serve`] with the receiver, a [`status::StatusSource`] and a
//! [`server::HealthHandle`].

pub mod authority;
pub mod client;
pub mod convert;
pub mod ecs;
pub mod ecs_k8s;
pub mod encoded;
pub mod filter;
pub mod hub;
pub mod jsonl;
pub mod metrics;
pub mod nats;
pub mod otlp;
pub mod pod_filter;
pub mod relay;
pub mod server;
pub mod sink;
pub mod status;
pub mod watch_json;

/// Generated protobuf types and gRPC client of `sockscope.v1`, with the
/// descriptor set they were generated from.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("sockscope.v1");

    /// Encoded file descriptor set of `sockscope.v1` and its imports (built
    /// by build.rs), served by reflection and used for proto3 JSON.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/sockscope_descriptor.bin"));

    /// The messages of [`FILE_DESCRIPTOR_SET`], decoded once. The set is
    /// built from our own protos, so a decoding failure is a build defect;
    /// it shows as an empty pool ("unknown message" where it is used).
    pub fn descriptor_pool() -> &'static prost_reflect::DescriptorPool {
        static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> =
            std::sync::OnceLock::new();
        POOL.get_or_init(|| {
            prost_reflect::DescriptorPool::decode(FILE_DESCRIPTOR_SET).unwrap_or_default()
        })
    }
}

pub use hub::{pipeline_channel, Hub, HubOptions, PipelineReceiver, PipelineSender};
pub use server::{
    bind, serve, serve_with_hub, HealthHandle, Listeners, ServerError, ServerOptions,
};
pub use status::{StatusSnapshot, StatusSource};
