//! The gRPC server: `sockscope.v1.FlowService` (hand-written server side so
//! flows go out pre-encoded), `grpc.health.v1`, and server reflection v1 and
//! v1alpha, on TCP (TLS or loopback plaintext) and a Unix socket.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::codegen::{http, Body, BoxFuture, StdError};
use tonic::server::{NamedService, ServerStreamingService, UnaryService};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::export::convert;
use crate::export::encoded::WireResponse;
use crate::export::filter::FilterSet;
use crate::export::hub::{Hub, HubOptions, PipelineReceiver, SubscribeRequest, Subscription};
use crate::export::proto;
use crate::export::status::{self, StatusSource};

/// gRPC service name of the flow service.
pub const SERVICE_NAME: &str = "sockscope.v1.FlowService";
/// Smallest `WatchStatus` interval; shorter requests are raised to it.
pub const MIN_WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Status snapshots buffered per `WatchStatus` stream.
const WATCH_STATUS_QUEUE: usize = 2;

/// Errors of setting up or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// `server.listen` is not an address.
    #[error("server.listen: invalid address {addr:?}: {source}")]
    ListenAddr {
        /// The configured value.
        addr: String,
        /// Parse error.
        source: std::net::AddrParseError,
    },
    /// Plaintext on a non-loopback address without `insecure_listen`.
    #[error(
        "server.listen: refusing plaintext gRPC on non-loopback address {0}; configure \
         server.tls_cert and server.tls_key, or set server.insecure_listen (--insecure-listen)"
    )]
    InsecureListen(SocketAddr),
    /// Only one of certificate and key given, or a client CA without them.
    #[error("server TLS: {0}")]
    TlsConfig(&'static str),
    /// Reading a TLS file failed.
    #[error("server TLS: reading {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// Binding the TCP listener failed.
    #[error("binding TCP {addr}: {source}")]
    BindTcp {
        /// The address.
        addr: SocketAddr,
        /// I/O error.
        source: std::io::Error,
    },
    /// Preparing or binding the Unix socket failed.
    #[error("unix socket {path}: {what}: {source}")]
    Unix {
        /// The socket path.
        path: PathBuf,
        /// The failed step.
        what: &'static str,
        /// I/O error.
        source: std::io::Error,
    },
    /// `server.health_listen` is not an address.
    #[error("server.health_listen: invalid address {addr:?}: {source}")]
    HealthAddr {
        /// The configured value.
        addr: String,
        /// Parse error.
        source: std::net::AddrParseError,
    },
    /// Neither TCP nor Unix socket configured.
    #[error("server: neither server.listen nor server.unix_socket is set")]
    NoListener,
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Building reflection failed.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// TLS material, as PEM file paths.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CA of client certificates; enables mTLS.
    pub client_ca: Option<PathBuf>,
}

/// Everything the server needs, derived from [`Config`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// TCP address, if enabled.
    pub listen: Option<SocketAddr>,
    /// Unix socket path, if enabled.
    pub unix_socket: Option<PathBuf>,
    /// Mode of the Unix socket file.
    pub unix_socket_mode: u32,
    /// TLS for the TCP listener.
    pub tls: Option<TlsFiles>,
    /// Plaintext TCP address serving only `grpc.health.v1`, if enabled.
    /// Exempt from the TLS rule: it carries no flow data.
    pub health_listen: Option<SocketAddr>,
    /// Fan-out options (history, queue size, node name).
    pub hub: HubOptions,
}

/// Where the kernel exposes the host name (`uname -n`).
const HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";

/// The machine's host name, or `localhost` when unavailable.
pub fn host_name() -> String {
    std::fs::read_to_string(HOSTNAME_PATH)
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl ServerOptions {
    /// Derives the options from the configuration and checks the listening
    /// policy: non-loopback TCP needs TLS or `insecure_listen`.
    pub fn from_config(cfg: &Config) -> Result<ServerOptions, ServerError> {
        let s = &cfg.server;
        let listen = if s.listen.trim().is_empty() {
            None
        } else {
            Some(s.listen.trim().parse::<SocketAddr>().map_err(|source| {
                ServerError::ListenAddr {
                    addr: s.listen.clone(),
                    source,
                }
            })?)
        };
        let unix_socket = (!s.unix_socket.trim().is_empty()).then(|| PathBuf::from(&s.unix_socket));
        if listen.is_none() && unix_socket.is_none() {
            return Err(ServerError::NoListener);
        }
        let tls = match (&s.tls_cert, &s.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: s.tls_client_ca.clone(),
            }),
            (None, None) if s.tls_client_ca.is_some() => {
                return Err(ServerError::TlsConfig(
                    "server.tls_client_ca requires server.tls_cert and server.tls_key",
                ))
            }
            (None, None) => None,
            _ => {
                return Err(ServerError::TlsConfig(
                    "server.tls_cert and server.tls_key must be set together",
                ))
            }
        };
        if let Some(addr) = listen {
            if !addr.ip().is_loopback() && tls.is_none() && !s.insecure_listen {
                return Err(ServerError::InsecureListen(addr));
            }
        }
        let health_listen = if s.health_listen.trim().is_empty() {
            None
        } else {
            Some(
                s.health_listen
                    .trim()
                    .parse::<SocketAddr>()
                    .map_err(|source| ServerError::HealthAddr {
                        addr: s.health_listen.clone(),
                        source,
                    })?,
            )
        };
        let node_name = s.node_name.clone().unwrap_or_else(host_name);
        let mut hub = HubOptions::new(s.history_size, s.subscriber_queue_size, &node_name);
        hub.host_name = host_name();
        Ok(ServerOptions {
            listen,
            unix_socket,
            unix_socket_mode: s.unix_socket_mode,
            tls,
            health_listen,
            hub,
        })
    }
}

/// Sets the `grpc.health.v1` status; cheap to clone, callable from any
/// thread (no runtime needed).
#[derive(Debug, Clone)]
pub struct HealthHandle {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for HealthHandle {
    fn default() -> Self {
        HealthHandle::new()
    }
}

impl HealthHandle {
    /// A handle starting as NOT_SERVING.
    pub fn new() -> HealthHandle {
        HealthHandle {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// SERVING when the pipeline is delivering, NOT_SERVING otherwise.
    pub fn set_serving(&self, serving: bool) {
        self.tx.send_replace(serving);
    }

    /// The current value.
    pub fn is_serving(&self) -> bool {
        *self.tx.borrow()
    }
}

/// Bound listeners, before serving.
#[derive(Debug)]
pub struct Listeners {
    tcp: Option<TcpListener>,
    tcp_addr: Option<SocketAddr>,
    unix: Option<(UnixListener, PathBuf)>,
    health: Option<(TcpListener, SocketAddr)>,
}

impl Listeners {
    /// The bound TCP address (useful with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The bound health-only TCP address.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(|(_, a)| *a)
    }

    /// The Unix socket path.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, p)| p.as_path())
    }
}

fn prepare_unix_socket(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    let err = |what, source| ServerError::Unix {
        path: path.to_path_buf(),
        what,
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| err("creating parent directory", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(err(
                    "refusing to replace a non-socket file",
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(
                    "another server is listening on it",
                    std::io::Error::from(std::io::ErrorKind::AddrInUse),
                ));
            }
            std::fs::remove_file(path).map_err(|e| err("removing stale socket", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("inspecting existing file", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| err("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err("setting mode", e))?;
    Ok(listener)
}

/// Binds a TCP listener and returns it with the address it got.
async fn bind_tcp(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let err = |source| ServerError::BindTcp { addr, source };
    let l = TcpListener::bind(addr).await.map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    Ok((l, local))
}

/// Binds the configured TCP address and Unix socket.
pub async fn bind(opts: &ServerOptions) -> Result<Listeners, ServerError> {
    let (tcp, tcp_addr) = match opts.listen {
        Some(addr) => {
            let (l, local) = bind_tcp(addr).await?;
            (Some(l), Some(local))
        }
        None => (None, None),
    };
    let unix = match &opts.unix_socket {
        Some(p) => Some((prepare_unix_socket(p, opts.unix_socket_mode)?, p.clone())),
        None => None,
    };
    let health = match opts.health_listen {
        Some(addr) => {
            let (l, local) = bind_tcp(addr).await?;
            Some((l, local))
        }
        None => None,
    };
    Ok(Listeners {
        tcp,
        tcp_addr,
        unix,
        health,
    })
}

fn tls_config(tls: &TlsFiles) -> Result<ServerTlsConfig, ServerError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|source| ServerError::TlsFile {
            path: p.clone(),
            source,
        })
    };
    let mut cfg =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    if let Some(ca) = &tls.client_ca {
        cfg = cfg.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(cfg)
}

/// Serves until `shutdown` completes: spawns the fan-out hub on `pipeline`,
/// answers status from `status` plus the hub, and reports health from
/// `health`.
pub async fn serve(
    listeners: Listeners,
    opts: ServerOptions,
    pipeline: PipelineReceiver,
    status: Arc<dyn StatusSource>,
    health: HealthHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let (hub, hub_task) = Hub::spawn(opts.hub.clone(), pipeline);
    let r = serve_with_hub(listeners, opts, hub, status, health, shutdown).await;
    hub_task.abort();
    r
}

/// Like [`serve`] with a fan-out hub the caller spawned (so it can also
/// subscribe in-process or read the hub's status); the hub keeps running
/// after this returns.
pub async fn serve_with_hub(
    listeners: Listeners,
    opts: ServerOptions,
    hub: Hub,
    status: Arc<dyn StatusSource>,
    health: HealthHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let svc = FlowServiceServer::new(FlowServiceImpl {
        hub,
        status,
        health: health.clone(),
    });
    let (reporter, health_svc) = tonic_health::server::health_reporter();
    let mut health_rx = health.tx.subscribe();
    let health_task = tokio::spawn(async move {
        loop {
            let st = if *health_rx.borrow_and_update() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", st).await;
            reporter.set_service_status(SERVICE_NAME, st).await;
            if health_rx.changed().await.is_err() {
                return;
            }
        }
    });
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::export::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let refl_v1 = reflection().build_v1()?;
    let refl_v1alpha = reflection().build_v1alpha()?;

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(tcp) = listeners.tcp {
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &opts.tls {
            builder = builder.tls_config(tls_config(tls)?)?;
        }
        let router = builder
            .add_service(svc.clone())
            .add_service(health_svc.clone())
            .add_service(refl_v1.clone())
            .add_service(refl_v1alpha.clone());
        let incoming = TcpListenerStream::new(tcp);
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move { router.serve_with_incoming_shutdown(incoming, stop).await });
    }
    if let Some((unix, path)) = listeners.unix {
        let router = tonic::transport::Server::builder()
            .add_service(svc.clone())
            .add_service(health_svc.clone())
            .add_service(refl_v1.clone())
            .add_service(refl_v1alpha.clone());
        // Clients may send the socket path as :authority; see `authority`.
        let incoming = UnixListenerStream::new(unix)
            .map(|conn| conn.map(crate::export::authority::AuthorityRewrite::new));
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move {
            let r = router.serve_with_incoming_shutdown(incoming, stop).await;
            let _ = std::fs::remove_file(&path);
            r
        });
    }
    if let Some((tcp, _)) = listeners.health {
        // Plaintext, health only: no flow data, so no TLS requirement.
        let router = tonic::transport::Server::builder().add_service(health_svc.clone());
        let incoming = TcpListenerStream::new(tcp);
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move { router.serve_with_incoming_shutdown(incoming, stop).await });
    }
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::error!("gRPC listener failed: {e}");
            if result.is_ok() {
                result = Err(ServerError::Transport(e));
            }
        }
    }
    health_task.abort();
    result
}

/// Implementation of the flow service methods.
#[derive(Clone)]
pub struct FlowServiceImpl {
    hub: Hub,
    status: Arc<dyn StatusSource>,
    health: HealthHandle,
}

fn timestamp_field(
    name: &str,
    ts: Option<&prost_types::Timestamp>,
) -> Result<Option<SystemTime>, Status> {
    ts.map(|t| {
        convert::system_time(t).ok_or_else(|| {
            Status::invalid_argument(format!(
                "{name}: invalid timestamp (seconds {}, nanos {})",
                t.seconds, t.nanos
            ))
        })
    })
    .transpose()
}

/// Validates a request into a hub subscription request.
pub fn subscribe_request(
    req: &proto::StreamFlowsRequest,
    peer: String,
) -> Result<SubscribeRequest, Status> {
    let filters = FilterSet::compile(&req.allow, &req.deny)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let since = timestamp_field("since", req.since.as_ref())?;
    let until = timestamp_field("until", req.until.as_ref())?;
    if let (Some(s), Some(u)) = (since, until) {
        if u < s {
            return Err(Status::invalid_argument("until: earlier than since"));
        }
    }
    Ok(SubscribeRequest {
        number: req.number,
        since,
        until,
        follow: req.follow,
        include_updates: req.include_updates,
        filters,
        peer,
        max_flows_per_response: usize::try_from(req.max_flows_per_response).unwrap_or(usize::MAX),
        ..SubscribeRequest::default()
    })
}

impl FlowServiceImpl {
    async fn stream_flows(
        &self,
        req: Request<proto::StreamFlowsRequest>,
    ) -> Result<Subscription, Status> {
        let peer = req
            .remote_addr()
            .map_or_else(|| "unix".to_string(), |a| a.to_string());
        let sub = subscribe_request(req.get_ref(), peer)?;
        self.hub.subscribe(sub).await
    }

    async fn get_status(&self) -> Result<proto::GetStatusResponse, Status> {
        let hub = self.hub.status().await?;
        let snap = self.status.snapshot();
        Ok(status::to_proto(
            &snap,
            &hub,
            self.hub.node_name(),
            self.health.is_serving(),
        ))
    }

    fn watch_status(
        &self,
        req: &proto::WatchStatusRequest,
    ) -> Result<ReceiverStream<Result<proto::GetStatusResponse, Status>>, Status> {
        let interval = match &req.interval {
            Some(d) => convert::std_duration(d).ok_or_else(|| {
                Status::invalid_argument("interval: negative or invalid duration")
            })?,
            None => MIN_WATCH_INTERVAL,
        }
        .max(MIN_WATCH_INTERVAL);
        let (tx, rx) = mpsc::channel(WATCH_STATUS_QUEUE);
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = tx.closed() => return,
                }
                let item = this.get_status().await;
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

/// The `sockscope.v1.FlowService` server. Hand-written (instead of the
/// generated one) so `StreamFlows` sends [`WireResponse`]s carrying flows
/// encoded once by the hub.
#[derive(Clone)]
pub struct FlowServiceServer {
    inner: Arc<FlowServiceImpl>,
}

impl FlowServiceServer {
    /// Wraps the implementation.
    pub fn new(inner: FlowServiceImpl) -> FlowServiceServer {
        FlowServiceServer {
            inner: Arc::new(inner),
        }
    }
}

impl NamedService for FlowServiceServer {
    const NAME: &'static str = SERVICE_NAME;
}

struct StreamFlowsSvc(Arc<FlowServiceImpl>);

impl ServerStreamingService<proto::StreamFlowsRequest> for StreamFlowsSvc {
    type Response = WireResponse;
    type ResponseStream = Subscription;
    type Future = BoxFuture<Response<Subscription>, Status>;

    fn call(&mut self, request: Request<proto::StreamFlowsRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.stream_flows(request).await.map(Response::new) })
    }
}

struct GetStatusSvc(Arc<FlowServiceImpl>);

impl UnaryService<proto::GetStatusRequest> for GetStatusSvc {
    type Response = proto::GetStatusResponse;
    type Future = BoxFuture<Response<proto::GetStatusResponse>, Status>;

    fn call(&mut self, _request: Request<proto::GetStatusRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.get_status().await.map(Response::new) })
    }
}

struct WatchStatusSvc(Arc<FlowServiceImpl>);

impl ServerStreamingService<proto::WatchStatusRequest> for WatchStatusSvc {
    type Response = proto::GetStatusResponse;
    type ResponseStream = ReceiverStream<Result<proto::GetStatusResponse, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<proto::WatchStatusRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.watch_status(request.get_ref()).map(Response::new) })
    }
}

impl<B> tower::Service<http::Request<B>> for FlowServiceServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        match req.uri().path() {
            "/sockscope.v1.FlowService/StreamFlows" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                    WireResponse,
                    proto::StreamFlowsRequest,
                >::default());
                Ok(grpc.server_streaming(StreamFlowsSvc(inner), req).await)
            }),
            "/sockscope.v1.FlowService/GetStatus" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                    proto::GetStatusResponse,
                    proto::GetStatusRequest,
                >::default());
                Ok(grpc.unary(GetStatusSvc(inner), req).await)
            }),
            "/sockscope.v1.FlowService/WatchStatus" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                    proto::GetStatusResponse,
                    proto::WatchStatusRequest,
                >::default());
                Ok(grpc.server_streaming(WatchStatusSvc(inner), req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("unknown method").into_http()) }),
        }
    }
}
