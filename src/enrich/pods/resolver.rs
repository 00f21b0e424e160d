//! The resolver: talks to the runtime's CRI socket, keeps the [`PodIndex`]
//! current, and answers the flow pipeline without ever making it wait.
//!
//! * A full listing every `kubernetes.resync_interval` replaces the index,
//!   so removed pods and containers are forgotten. A sandbox's status (its
//!   addresses) and a container's image name are asked once and kept while
//!   the sandbox or container lives.
//! * A container id the pipeline does not find ([`PodView::container`]) is
//!   sent, without waiting, on a bounded queue; the resolver looks it up on
//!   its own (one `ListContainers` by id, and its sandbox when new). An id
//!   the runtime does not know is remembered as absent until the next
//!   listing; after a failure the id is asked again once
//!   [`FAILED_RETRY`] has passed.
//! * Every call has a deadline (`kubernetes.request_timeout`). A runtime
//!   that is gone or does not answer makes lookups fail, counted in
//!   [`PodResolverStatus`], while flows go out without pod fields; the
//!   index keeps what it knew until a listing succeeds again.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Uri};

use super::cri_api as cri;
use super::cri_api::runtime_service_client::RuntimeServiceClient;
use super::index::{is_image_id, IndexLimits, Listing, PodIndex};
use crate::model::{FlowRecord, PodIdentity, PodResolverStatus};

/// Capacity of the queue of container ids the pipeline asks for.
pub const LOOKUP_QUEUE: usize = 1024;
/// How long after a failed lookup a container id is asked again.
pub const FAILED_RETRY: Duration = Duration::from_secs(2);
/// Container ids looked up one by one per wake-up; more wait for the next.
const LOOKUP_BATCH: usize = 64;
/// CRI version the resolver speaks.
const CRI_VERSION: &str = "v1";
/// `:authority` sent over the Unix socket.
const CRI_AUTHORITY: &str = "localhost";
/// Largest CRI answer accepted (a node with many pods lists a lot).
const MAX_CRI_MESSAGE: usize = 16 * 1024 * 1024;
/// Longest error text kept.
const MAX_ERROR_LEN: usize = 512;

/// What the resolver needs.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// The runtime's CRI Unix socket.
    pub socket: PathBuf,
    /// Interval of full listings.
    pub resync_interval: Duration,
    /// Deadline of each call.
    pub request_timeout: Duration,
    /// Bounds and selections.
    pub limits: IndexLimits,
}

/// Why a call to the runtime failed.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The socket could not be connected.
    #[error("cannot connect to the container runtime at {socket}: {source}")]
    Connect {
        /// The socket.
        socket: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A call returned an error.
    #[error("container runtime call {call} failed: {status}")]
    Call {
        /// The call.
        call: &'static str,
        /// The answer.
        status: Box<tonic::Status>,
    },
    /// A call did not answer in time.
    #[error("container runtime call {call} did not answer within {timeout:?}")]
    Timeout {
        /// The call.
        call: &'static str,
        /// The deadline.
        timeout: Duration,
    },
}

/// Counters the resolver shares with status and metrics.
#[derive(Debug, Default)]
struct Counters {
    connected: AtomicBool,
    lookups: AtomicU64,
    lookup_failures: AtomicU64,
    resyncs: AtomicU64,
    resync_failures: AtomicU64,
    requests_dropped: AtomicU64,
    runtime: Mutex<String>,
    last_error: Mutex<String>,
}

/// State shared by the resolver task and its views.
#[derive(Debug)]
struct Shared {
    socket: PathBuf,
    index: RwLock<PodIndex>,
    /// Container ids not to ask for again before the instant.
    hold: RwLock<HashMap<String, Instant>>,
    counters: Counters,
}

impl Shared {
    fn fail(&self, e: &CriError) {
        self.counters.connected.store(false, Ordering::Relaxed);
        let mut text = e.to_string();
        text.truncate(MAX_ERROR_LEN);
        if let Ok(mut g) = self.counters.last_error.lock() {
            *g = text;
        }
    }

    fn held(&self, id: &str, now: Instant) -> bool {
        self.hold
            .read()
            .map(|h| h.get(id).is_some_and(|until| *until > now))
            .unwrap_or(false)
    }

    fn hold_until(&self, id: &str, until: Instant) {
        if let Ok(mut h) = self.hold.write() {
            h.insert(id.to_string(), until);
        }
    }
}

/// The pipeline's handle: lookups that never wait.
#[derive(Debug, Clone)]
pub struct PodView {
    shared: Arc<Shared>,
    requests: mpsc::Sender<String>,
}

impl PodView {
    /// The pod and container of container `id`; when unknown, the id is
    /// queued for lookup (a full queue is counted) and `None` returned.
    pub fn container(&self, id: &str) -> Option<Arc<PodIdentity>> {
        let found = self
            .shared
            .index
            .read()
            .ok()
            .and_then(|i| i.container(id).cloned());
        if found.is_none() {
            self.ask(id);
        }
        found
    }

    /// Queues container `id` for lookup unless it is held back; a full
    /// queue is counted.
    fn ask(&self, id: &str) {
        if !self.shared.held(id, Instant::now()) && self.requests.try_send(id.to_string()).is_err()
        {
            self.shared
                .counters
                .requests_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Fills a record's pod (from its process's container) and remote pod
    /// (from its remote address), with one read of the index.
    pub fn attach(&self, rec: &mut FlowRecord) {
        let id = rec.process.as_ref().and_then(|p| p.container_id.as_deref());
        let (pod, remote) = match self.shared.index.read() {
            Ok(i) => (
                id.and_then(|id| i.container(id).cloned()),
                i.by_ip(&rec.remote.ip).cloned(),
            ),
            Err(_) => (None, None),
        };
        if let (Some(id), None) = (id, &pod) {
            self.ask(id);
        }
        rec.pod = pod;
        rec.remote_pod = remote;
    }

    /// A snapshot of the resolver's counters.
    pub fn status(&self) -> PodResolverStatus {
        self.shared.status()
    }

    /// A handle that reads the counters only: it does not keep the
    /// resolver running as a view does.
    pub fn status_handle(&self) -> PodStatusHandle {
        PodStatusHandle(self.shared.clone())
    }
}

/// Reads the resolver's counters.
#[derive(Debug, Clone)]
pub struct PodStatusHandle(Arc<Shared>);

impl PodStatusHandle {
    /// A snapshot of the counters.
    pub fn status(&self) -> PodResolverStatus {
        self.0.status()
    }
}

impl Shared {
    fn status(&self) -> PodResolverStatus {
        let c = &self.counters;
        let (pods, containers, left_out) = self
            .index
            .read()
            .map(|i| (i.pods() as u64, i.containers() as u64, i.left_out))
            .unwrap_or_default();
        PodResolverStatus {
            endpoint: self.socket.display().to_string(),
            connected: c.connected.load(Ordering::Relaxed),
            runtime: c.runtime.lock().map(|g| g.clone()).unwrap_or_default(),
            pods,
            containers,
            lookups: c.lookups.load(Ordering::Relaxed),
            lookup_failures: c.lookup_failures.load(Ordering::Relaxed),
            resyncs: c.resyncs.load(Ordering::Relaxed),
            resync_failures: c.resync_failures.load(Ordering::Relaxed),
            requests_dropped: c.requests_dropped.load(Ordering::Relaxed),
            left_out,
            last_error: c.last_error.lock().map(|g| g.clone()).unwrap_or_default(),
        }
    }
}

/// Connects a channel to a CRI Unix socket (lazily: nothing is sent until
/// the first call).
fn channel(socket: &Path) -> Result<Channel, CriError> {
    let ep = Endpoint::from_shared(format!("http://{CRI_AUTHORITY}")).map_err(|source| {
        CriError::Connect {
            socket: socket.display().to_string(),
            source,
        }
    })?;
    let path = socket.to_path_buf();
    Ok(
        ep.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        })),
    )
}

/// The resolver: owns the connection and refreshes the shared index.
pub struct Resolver {
    cfg: ResolverConfig,
    shared: Arc<Shared>,
    client: Option<RuntimeServiceClient<Channel>>,
    /// Sandbox statuses kept between listings.
    statuses: HashMap<String, cri::PodSandboxStatus>,
    /// Image names of containers whose listing gives an image id.
    image_names: HashMap<String, String>,
    /// Whether the runtime's version was read on this connection.
    versioned: bool,
}

impl Resolver {
    /// A resolver for `cfg` and the view the pipeline uses, with the
    /// receiving end of the view's lookup queue.
    pub fn new(cfg: ResolverConfig) -> (Resolver, PodView, mpsc::Receiver<String>) {
        let shared = Arc::new(Shared {
            socket: cfg.socket.clone(),
            index: RwLock::new(PodIndex::default()),
            hold: RwLock::new(HashMap::new()),
            counters: Counters::default(),
        });
        let (tx, rx) = mpsc::channel(LOOKUP_QUEUE);
        let view = PodView {
            shared: shared.clone(),
            requests: tx,
        };
        let r = Resolver {
            cfg,
            shared,
            client: None,
            statuses: HashMap::new(),
            image_names: HashMap::new(),
            versioned: false,
        };
        (r, view, rx)
    }

    /// A snapshot of the counters.
    pub fn status(&self) -> PodResolverStatus {
        self.shared.status()
    }

    /// Runs until every view is gone: a listing at once and every
    /// `resync_interval`, and the lookups the views ask for in between.
    pub async fn run(mut self, mut rx: mpsc::Receiver<String>) {
        let mut tick = tokio::time::interval(self.cfg.resync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.resync().await {
                        tracing::warn!(error = %e, "pod listing failed");
                    }
                }
                first = rx.recv() => {
                    let Some(first) = first else { return };
                    let mut ids = HashSet::from([first]);
                    while ids.len() < LOOKUP_BATCH {
                        match rx.try_recv() {
                            Ok(id) => { ids.insert(id); }
                            Err(_) => break,
                        }
                    }
                    for id in ids {
                        let _ = self.lookup(&id).await;
                    }
                }
            }
        }
    }

    fn client(&mut self) -> Result<RuntimeServiceClient<Channel>, CriError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let c = RuntimeServiceClient::new(channel(&self.cfg.socket)?)
            .max_decoding_message_size(MAX_CRI_MESSAGE);
        self.client = Some(c.clone());
        self.versioned = false;
        Ok(c)
    }

    /// Runs one call with the deadline; a failure drops the connection.
    async fn call<T, F>(&mut self, name: &'static str, fut: F) -> Result<T, CriError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let res = match tokio::time::timeout(self.cfg.request_timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(CriError::Call {
                call: name,
                status: Box::new(status),
            }),
            Err(_) => Err(CriError::Timeout {
                call: name,
                timeout: self.cfg.request_timeout,
            }),
        };
        match &res {
            Ok(_) => self
                .shared
                .counters
                .connected
                .store(true, Ordering::Relaxed),
            Err(e) => {
                // NOT_FOUND is an answer, not a broken runtime.
                if !matches!(e, CriError::Call { status, .. } if status.code() == tonic::Code::NotFound)
                {
                    self.client = None;
                    self.shared.fail(e);
                }
            }
        }
        res
    }

    async fn ensure_version(&mut self) -> Result<(), CriError> {
        if self.versioned && self.client.is_some() {
            return Ok(());
        }
        let mut c = self.client()?;
        let v = self
            .call(
                "Version",
                c.version(cri::VersionRequest {
                    version: CRI_VERSION.into(),
                }),
            )
            .await?;
        if let Ok(mut g) = self.shared.counters.runtime.lock() {
            *g = format!("{} {}", v.runtime_name, v.runtime_version);
        }
        self.versioned = true;
        Ok(())
    }

    async fn sandbox_status(
        &mut self,
        id: &str,
    ) -> Result<Option<cri::PodSandboxStatus>, CriError> {
        if let Some(s) = self.statuses.get(id) {
            return Ok(Some(s.clone()));
        }
        let mut c = self.client()?;
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: false,
        };
        match self
            .call("PodSandboxStatus", c.pod_sandbox_status(req))
            .await
        {
            Ok(r) => {
                let s = r.status;
                if let Some(s) = &s {
                    self.statuses.insert(id.to_string(), s.clone());
                }
                Ok(s)
            }
            Err(CriError::Call { status, .. }) if status.code() == tonic::Code::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn image_name(&mut self, c: &cri::Container) -> Result<Option<String>, CriError> {
        let listed = c.image.as_ref().map(|i| i.image.as_str()).unwrap_or("");
        if !is_image_id(listed) {
            return Ok(None);
        }
        if let Some(n) = self.image_names.get(&c.id) {
            return Ok(Some(n.clone()));
        }
        let mut client = self.client()?;
        let req = cri::ContainerStatusRequest {
            container_id: c.id.clone(),
            verbose: false,
        };
        match self
            .call("ContainerStatus", client.container_status(req))
            .await
        {
            Ok(r) => {
                let name = r
                    .status
                    .and_then(|s| s.image)
                    .map(|i| i.image)
                    .filter(|n| !is_image_id(n));
                if let Some(n) = &name {
                    self.image_names.insert(c.id.clone(), n.clone());
                }
                Ok(name)
            }
            Err(CriError::Call { status, .. }) if status.code() == tonic::Code::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Lists every sandbox and container and replaces the index.
    pub async fn resync(&mut self) -> Result<(), CriError> {
        let res = self.resync_inner().await;
        let c = &self.shared.counters;
        match &res {
            Ok(()) => c.resyncs.fetch_add(1, Ordering::Relaxed),
            Err(_) => c.resync_failures.fetch_add(1, Ordering::Relaxed),
        };
        res
    }

    async fn resync_inner(&mut self) -> Result<(), CriError> {
        self.ensure_version().await?;
        let mut c = self.client()?;
        let sandboxes = self
            .call(
                "ListPodSandbox",
                c.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }),
            )
            .await?
            .items;
        let containers = self
            .call(
                "ListContainers",
                c.list_containers(cri::ListContainersRequest { filter: None }),
            )
            .await?
            .containers;
        let live: HashSet<&str> = sandboxes.iter().map(|s| s.id.as_str()).collect();
        self.statuses.retain(|id, _| live.contains(id.as_str()));
        let live_c: HashSet<&str> = containers.iter().map(|c| c.id.as_str()).collect();
        self.image_names
            .retain(|id, _| live_c.contains(id.as_str()));
        let mut listing = Listing::default();
        for sb in &sandboxes {
            if let Some(s) = self.sandbox_status(&sb.id).await? {
                listing.statuses.insert(sb.id.clone(), s);
            }
        }
        for ct in &containers {
            if let Some(n) = self.image_name(ct).await? {
                listing.image_names.insert(ct.id.clone(), n);
            }
        }
        listing.sandboxes = sandboxes;
        listing.containers = containers;
        let idx = PodIndex::build(&listing, &self.cfg.limits);
        if let Ok(mut g) = self.shared.index.write() {
            *g = idx;
        }
        // The listing is the whole truth: ids held as absent may exist now.
        if let Ok(mut h) = self.shared.hold.write() {
            h.clear();
        }
        Ok(())
    }

    /// Looks one container up (full lower-case id) and adds it, with its
    /// sandbox when new, to the index. `Ok(None)`: the runtime does not
    /// know it (not a CRI container); it is held as absent until the next
    /// listing.
    pub async fn lookup(&mut self, id: &str) -> Result<Option<Arc<PodIdentity>>, CriError> {
        let now = Instant::now();
        if let Some(p) = self
            .shared
            .index
            .read()
            .ok()
            .and_then(|i| i.container(id).cloned())
        {
            return Ok(Some(p));
        }
        if self.shared.held(id, now) {
            return Ok(None);
        }
        self.shared.counters.lookups.fetch_add(1, Ordering::Relaxed);
        let res = self.lookup_inner(id).await;
        match &res {
            Ok(Some(_)) => {}
            Ok(None) => self.shared.hold_until(id, now + self.cfg.resync_interval),
            Err(_) => {
                self.shared
                    .counters
                    .lookup_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.shared.hold_until(id, now + FAILED_RETRY);
            }
        }
        res
    }

    async fn lookup_inner(&mut self, id: &str) -> Result<Option<Arc<PodIdentity>>, CriError> {
        self.ensure_version().await?;
        let mut c = self.client()?;
        let filter = cri::ContainerFilter {
            id: id.to_string(),
            ..Default::default()
        };
        let found = self
            .call(
                "ListContainers",
                c.list_containers(cri::ListContainersRequest {
                    filter: Some(filter),
                }),
            )
            .await?
            .containers;
        let Some(ct) = found.into_iter().find(|ct| ct.id.eq_ignore_ascii_case(id)) else {
            return Ok(None);
        };
        let known = self
            .shared
            .index
            .read()
            .map(|i| i.has_sandbox(&ct.pod_sandbox_id))
            .unwrap_or(false);
        if !known {
            let filter = cri::PodSandboxFilter {
                id: ct.pod_sandbox_id.clone(),
                ..Default::default()
            };
            let sbs = self
                .call(
                    "ListPodSandbox",
                    c.list_pod_sandbox(cri::ListPodSandboxRequest {
                        filter: Some(filter),
                    }),
                )
                .await?
                .items;
            let Some(sb) = sbs.into_iter().find(|s| s.id == ct.pod_sandbox_id) else {
                return Ok(None);
            };
            let status = self.sandbox_status(&sb.id).await?;
            if let Ok(mut g) = self.shared.index.write() {
                g.add_sandbox(&sb, status.as_ref(), &self.cfg.limits);
            }
        }
        let image = self.image_name(&ct).await?;
        let mut g = match self.shared.index.write() {
            Ok(g) => g,
            Err(_) => return Ok(None),
        };
        g.add_container(&ct, image.as_deref(), &self.cfg.limits);
        Ok(g.container(id).cloned())
    }

    /// Every container known, in id order.
    pub fn containers(&self) -> Vec<(String, Arc<PodIdentity>)> {
        self.shared
            .index
            .read()
            .map(|i| {
                i.iter_containers()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(socket: PathBuf) -> ResolverConfig {
        ResolverConfig {
            socket,
            resync_interval: Duration::from_secs(30),
            request_timeout: Duration::from_millis(300),
            limits: IndexLimits {
                max_pods: 8,
                max_containers: 8,
                annotations: Vec::new(),
            },
        }
    }

    const ID: &str = "3f1b5c2e9a8d7f6e5d4c3b2a1908f7e6d5c4b3a29180f7e6d5c4b3a291807f6e";

    #[tokio::test]
    async fn a_runtime_that_does_not_answer_fails_lookups_within_the_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("cri.sock");
        // Accepts connections and never answers: a hung runtime.
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        });
        let (mut r, view, mut rx) = Resolver::new(cfg(sock));
        // The pipeline's side never waits: a miss is queued.
        assert!(view.container(ID).is_none());
        assert_eq!(rx.try_recv().ok().as_deref(), Some(ID));
        let t0 = Instant::now();
        let e = r.lookup(ID).await.expect_err("no answer");
        assert!(matches!(e, CriError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        let s = view.status();
        assert_eq!((s.lookups, s.lookup_failures, s.connected), (1, 1, false));
        assert!(s.last_error.contains("did not answer"), "{}", s.last_error);
        // Held back after the failure: the view does not ask again at once.
        assert!(view.container(ID).is_none());
        assert!(rx.try_recv().is_err());
        assert!(r.resync().await.is_err());
        assert_eq!(view.status().resync_failures, 1);
        held.abort();
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_failure_and_a_full_queue_is_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut r, view, _rx) = Resolver::new(cfg(dir.path().join("absent.sock")));
        let e = r.resync().await.expect_err("no socket");
        assert!(e.to_string().contains("container runtime"), "{e}");
        for i in 0..LOOKUP_QUEUE + 3 {
            assert!(view.container(&format!("{i:064x}")).is_none());
        }
        assert_eq!(view.status().requests_dropped, 3);
    }
}
