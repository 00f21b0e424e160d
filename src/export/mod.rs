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
pub mod filter;
pub mod hub;
pub mod jsonl;
pub mod metrics;
pub mod server;
pub mod status;
pub mod wire;

/// Generated protobuf types and gRPC client of `sockscope.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("sockscope.v1");
}

pub use hub::{pipeline_channel, Hub, HubOptions, PipelineReceiver, PipelineSender};
pub use server::{
    bind, serve, serve_with_hub, HealthHandle, Listeners, ServerError, ServerOptions,
};
pub use status::{StatusSnapshot, StatusSource};
