//! `sockscope relay`: a stateless `sockscope.v1.FlowService` backed by the
//! cluster's JetStream stream instead of one node's fan-out, so grpcurl,
//! the Python client and `sockscope watch --server` read every node's flows
//! unchanged. Any number of relays can serve the same stream.
//!
//! * `StreamFlows` reads the stream as [`read`] does for `watch --nats`
//!   (`number`: the stream's last messages; `since`/`until`; `follow`;
//!   filters and `include_updates` as on a daemon; loss notices always).
//!   Each response carries the publishing node's name; `sequence` counts
//!   the responses of this stream from 1, as a daemon's does. A request
//!   with `max_flows_per_response` above 1 gets every flow in `flows` (one
//!   per response).
//! * `GetStatus` answers the relay's own version, uptime and name, whether
//!   the NATS connection is up (`serving`), and `nodes_seen`: each node in
//!   the stream with its flow records and loss notices stored and when its
//!   last message was stored. `WatchStatus` repeats it.
//! * Nothing is kept: a client that reads slowly holds back only its own
//!   consumer, and the stream keeps what it stores.

use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::config::NatsConfig;
use crate::export::convert;
use crate::export::filter::FilterSet;
use crate::export::nats::read::{self, ReadError, READ_QUEUE};
use crate::export::proto::{self, flow_service_server::FlowService};
use crate::export::server::MIN_WATCH_INTERVAL;

/// The relay's service.
#[derive(Clone)]
pub struct Relay {
    client: async_nats::Client,
    cfg: NatsConfig,
    name: String,
    started: Instant,
}

impl Relay {
    /// A relay reading the stream of `cfg` over `client`, answering as
    /// `name`.
    pub fn new(client: async_nats::Client, cfg: NatsConfig, name: String) -> Relay {
        Relay {
            client,
            cfg,
            name,
            started: Instant::now(),
        }
    }

    async fn status(&self) -> Result<proto::GetStatusResponse, Status> {
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        let (nodes, last_error) = match read::nodes_seen(self.client.clone(), &self.cfg).await {
            Ok(n) => (n, String::new()),
            Err(e) => (Vec::new(), e.to_string()),
        };
        Ok(proto::GetStatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime: Some(convert::duration(self.started.elapsed())),
            node_name: self.name.clone(),
            serving: connected && last_error.is_empty(),
            last_error,
            nodes_seen: nodes,
            ..Default::default()
        })
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn status_of(e: ReadError) -> Status {
    match e {
        ReadError::Filter(m) => Status::invalid_argument(m),
        ReadError::Stream { .. } => Status::unavailable(e.to_string()),
        ReadError::Consume { .. } => Status::unavailable(e.to_string()),
    }
}

#[tonic::async_trait]
impl FlowService for Relay {
    type StreamFlowsStream = Boxed<proto::StreamFlowsResponse>;
    type WatchStatusStream = Boxed<proto::GetStatusResponse>;

    async fn stream_flows(
        &self,
        request: Request<proto::StreamFlowsRequest>,
    ) -> Result<Response<Self::StreamFlowsStream>, Status> {
        let req = request.into_inner();
        // Refused before anything is read, naming the field.
        FilterSet::compile(&req.allow, &req.deny)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let packed = req.max_flows_per_response > 1;
        let (tx, rx) = mpsc::channel(READ_QUEUE);
        let (client, cfg) = (self.client.clone(), self.cfg.clone());
        tokio::spawn(async move { read::read(client, &cfg, &req, tx).await });
        let mut sequence = 0u64;
        let out = ReceiverStream::new(rx).map(move |r| {
            let mut resp = r.map_err(status_of)?;
            sequence += 1;
            resp.sequence = sequence;
            if packed {
                if let Some(proto::stream_flows_response::Event::Flow(f)) = resp
                    .event
                    .take_if(|e| matches!(e, proto::stream_flows_response::Event::Flow(_)))
                {
                    resp.flows = vec![f];
                }
            }
            Ok(resp)
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn get_status(
        &self,
        _request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, Status> {
        Ok(Response::new(self.status().await?))
    }

    async fn watch_status(
        &self,
        request: Request<proto::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let every = request
            .get_ref()
            .interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(MIN_WATCH_INTERVAL)
            .max(MIN_WATCH_INTERVAL);
        let relay = self.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if tx.send(relay.status().await).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the relay on `listener` until `shutdown`, with gRPC health and
/// server reflection (for grpcurl).
pub async fn serve(
    relay: Relay,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<proto::flow_service_server::FlowServiceServer<Relay>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let mut router = tonic::transport::Server::builder()
        .add_service(proto::flow_service_server::FlowServiceServer::new(relay))
        .add_service(health);
    if let (Ok(v1), Ok(v1alpha)) = (reflection().build_v1(), reflection().build_v1alpha()) {
        router = router.add_service(v1).add_service(v1alpha);
    }
    router
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}
