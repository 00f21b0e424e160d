//! Data that crosses pipeline stages.
//!
//! `decode` produces [`Event`]s, `flow` consumes them and produces [`Output`]s
//! ([`FlowRecord`]s and [`Loss`] notices), `export` turns those into gRPC
//! messages and ECS documents. Keeping these types here, free of any stage's
//! internals, lets every stage be tested on its own.

mod pod;
pub use pod::*;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

/// Kernel timestamp in nanoseconds, on the clock the perf events were opened
/// with (see `ring::clock`). Only differences and ordering are meaningful;
/// `ring::clock::WallClock` converts it to wall time.
pub type KernelTime = u64;

/// Kernel address of a `struct sock`, used as the socket's identity.
pub type SockAddr = u64;

/// One raw perf sample as the ring reader hands it to the decoder, in
/// timestamp order across CPUs. `data` is the tracepoint/kprobe record
/// (PERF_SAMPLE_RAW) laid out as the event's tracefs `format` file says;
/// it is untrusted.
#[derive(Debug, Clone, Copy)]
pub struct RawSample<'a> {
    /// Index of the event in the list the rings were opened with.
    pub event: u32,
    /// Kernel timestamp (PERF_SAMPLE_TIME).
    pub time: KernelTime,
    /// CPU the sample was taken on (PERF_SAMPLE_CPU).
    pub cpu: u32,
    /// Thread group id of the current task (PERF_SAMPLE_TID).
    pub pid: u32,
    /// Thread id of the current task (PERF_SAMPLE_TID).
    pub tid: u32,
    /// The raw record.
    pub data: &'a [u8],
}

/// Transport protocol of a socket or packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// IPPROTO_TCP.
    Tcp,
    /// IPPROTO_UDP.
    Udp,
}

impl Transport {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Transport::Tcp => 6,
            Transport::Udp => 17,
        }
    }

    /// Lower-case ECS name (`tcp`, `udp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// Direction of one packet relative to the local host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketDir {
    /// Sent by a local socket.
    Egress,
    /// Received for a local socket.
    Ingress,
}

/// Who initiated a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FlowDirection {
    /// The local side initiated (connect, first UDP send).
    Egress,
    /// The remote side initiated (accept, first UDP receive).
    Ingress,
    /// The start of the flow was not observed.
    #[default]
    Unknown,
}

impl FlowDirection {
    /// ECS name (`egress`, `ingress`, `unknown`).
    pub fn as_str(self) -> &'static str {
        match self {
            FlowDirection::Egress => "egress",
            FlowDirection::Ingress => "ingress",
            FlowDirection::Unknown => "unknown",
        }
    }
}

/// The task that caused an event, when the event ran in that task's
/// syscall context. Events from softirq/hardirq context, or from probes on
/// the packet path, carry no task: their `common_pid` is whatever task the
/// interrupt happened to hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Task {
    /// Thread group id (the process id user space sees).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
}

/// One IP packet seen on the local stack, with the addresses taken from its
/// own headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// The socket the kernel handed with the packet, when the probe has one.
    pub sock: Option<SockAddr>,
    /// Egress or ingress.
    pub dir: PacketDir,
    /// TCP or UDP.
    pub transport: Transport,
    /// Source address and port, from the packet headers.
    pub src: SocketAddr,
    /// Destination address and port, from the packet headers.
    pub dst: SocketAddr,
    /// IP packet length: IP header(s) + transport header + payload.
    pub ip_len: u32,
    /// The TCP flags byte ([`TCP_SYN`], [`TCP_ACK`], …) when the packet is
    /// TCP and its header was within the fetched bytes.
    pub tcp_flags: Option<u8>,
    /// The TCP sequence number and payload length, when the packet is TCP
    /// and its header was within the fetched bytes.
    pub tcp_seq: Option<TcpSeq>,
}

/// Where a TCP packet's bytes lie in its sender's sequence space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSeq {
    /// The header's sequence number (the SYN's own number on a SYN).
    pub seq: u32,
    /// Payload bytes: the IP length less the IP and TCP headers.
    pub payload: u32,
}

/// TCP flag: no more data from the sender (takes one sequence number).
pub const TCP_FIN: u8 = 0x01;
/// TCP flag: synchronize (opens a connection; takes one sequence number).
pub const TCP_SYN: u8 = 0x02;
/// TCP flag: reset the connection.
pub const TCP_RST: u8 = 0x04;
/// TCP flag: the acknowledgment field is significant.
pub const TCP_ACK: u8 = 0x10;

/// What a syscall-context socket operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SockOp {
    /// sendmsg/sendto/write on the socket.
    Send,
    /// recvmsg/recvfrom/read on the socket.
    Recv,
}

/// Credentials of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Creds {
    /// Real user id.
    pub uid: u32,
    /// Real group id.
    pub gid: u32,
    /// Effective user id.
    pub euid: u32,
    /// Effective group id.
    pub egid: u32,
}

/// A decoded kernel event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// An AF_INET/AF_INET6 socket was created.
    SockCreate {
        /// The new `struct sock`.
        sock: SockAddr,
        /// The transport, when the probe could tell.
        transport: Option<Transport>,
    },
    /// A TCP socket started an active open (SYN about to be sent); both
    /// ends are known at this point.
    TcpConnect {
        /// The connecting socket.
        sock: SockAddr,
        /// Local address and (already bound) port.
        local: SocketAddr,
        /// Remote address and port.
        remote: SocketAddr,
    },
    /// `accept` returned a new TCP socket.
    TcpAccept {
        /// The accepted socket.
        sock: SockAddr,
        /// Local address and port.
        local: SocketAddr,
        /// Remote address and port.
        remote: SocketAddr,
    },
    /// A syscall-context send or receive on a socket (process attribution).
    SockActivity {
        /// The socket.
        sock: SockAddr,
        /// TCP or UDP.
        transport: Transport,
        /// Send or receive.
        op: SockOp,
        /// For UDP sends, the explicit destination (`msg_name`), if any.
        peer: Option<SocketAddr>,
    },
    /// A syscall-context receive on a UDP socket, with the address and port
    /// the socket is bound to (unspecified address for a wildcard bind, port
    /// 0 when unbound). Ties a receive-only socket, which never sends a
    /// packet the engine could learn its address from, to its ingress
    /// packets.
    UdpRecv {
        /// The socket.
        sock: SockAddr,
        /// Bound local address and port.
        local: SocketAddr,
    },
    /// A packet on the local IP stack.
    Packet(Packet),
    /// A TCP socket ended (destroyed after its owner closed it and its
    /// connection was over), with its own counters.
    TcpClose {
        /// The socket.
        sock: SockAddr,
        /// Local address and port.
        local: SocketAddr,
        /// Remote address and port.
        remote: SocketAddr,
        /// The socket's counters at that moment (final).
        counters: TcpSockCounters,
    },
    /// The socket was released (close of the last reference).
    SockClose {
        /// The released socket.
        sock: SockAddr,
    },
    /// A process called execve successfully.
    Exec {
        /// Process id.
        pid: u32,
        /// Path of the executed file as the kernel saw it.
        filename: String,
    },
    /// A new program image is about to run: its argument count and its
    /// leading arguments as the exec'ing process passed them (as many as
    /// the probe fetches; an argument that could not be read is empty). Arrives right before the [`EventKind::Exec`] of
    /// the same process.
    ExecArgs {
        /// Process id.
        pid: u32,
        /// `argc` as the new image sees it.
        argc: u32,
        /// The first `argc` arguments, at most as many as were fetched.
        args: Vec<String>,
    },
    /// A process or thread was created.
    Fork {
        /// Parent process id.
        parent: u32,
        /// Child process (or thread) id.
        child: u32,
    },
    /// A task exited.
    Exit {
        /// The exiting task's tid; equal to its pid for the group leader.
        tid: u32,
        /// Its thread group id, when known.
        pid: u32,
    },
    /// A task installed new credentials (`commit_creds`).
    Creds(Creds),
}

/// A decoded kernel event with its time, CPU and (when meaningful) task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Kernel timestamp.
    pub time: KernelTime,
    /// CPU the sample was taken on.
    pub cpu: u32,
    /// The task in whose syscall context the event happened, if any.
    pub task: Option<Task>,
    /// What happened.
    pub kind: EventKind,
}

/// Where samples or records were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LossSource {
    /// The kernel dropped samples because a per-CPU perf ring was full.
    KernelRing,
    /// A kretprobe could not run because its instance pool was exhausted.
    KretprobeMiss,
    /// Samples that could not be decoded (malformed or unexpected).
    DecodeError,
    /// The queue between the ring reader and the flow engine overflowed.
    ReaderQueue,
    /// A socket was evicted from the full socket table.
    SocketTableEviction,
    /// A flow was evicted from the full flow table.
    FlowTableEviction,
    /// A process was evicted from the full process table.
    ProcessTableEviction,
    /// This subscriber's own queue overflowed.
    SubscriberQueue,
    /// The history ring was lapped while this subscriber was replaying.
    HistoryLapped,
}

impl LossSource {
    /// Stable snake_case name, used in logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            LossSource::KernelRing => "kernel_ring",
            LossSource::KretprobeMiss => "kretprobe_miss",
            LossSource::DecodeError => "decode_error",
            LossSource::ReaderQueue => "reader_queue",
            LossSource::SocketTableEviction => "socket_table_eviction",
            LossSource::FlowTableEviction => "flow_table_eviction",
            LossSource::ProcessTableEviction => "process_table_eviction",
            LossSource::SubscriberQueue => "subscriber_queue",
            LossSource::HistoryLapped => "history_lapped",
        }
    }
}

/// A count of lost items from one source over a time range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// Where the loss happened.
    pub source: LossSource,
    /// The CPU, for per-CPU sources.
    pub cpu: Option<u32>,
    /// How many items were lost.
    pub count: u64,
    /// Wall time of the first loss in this notice.
    pub first: SystemTime,
    /// Wall time of the last loss in this notice.
    pub last: SystemTime,
}

/// One side of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// IP address.
    pub ip: IpAddr,
    /// Port.
    pub port: u16,
    /// Packets sent by this endpoint.
    pub packets: u64,
    /// Bytes (IP packet lengths) sent by this endpoint.
    pub bytes: u64,
    /// DNS name this endpoint's address was resolved from, if known.
    pub domain: Option<String>,
    /// What the TCP sequence numbers of this endpoint's counted packets
    /// show; `None` when not known or not applicable (UDP, socket-counter
    /// accounting, no TCP packet of this endpoint counted).
    pub sequence: Option<SeqSpace>,
}

/// An endpoint's TCP sequence space as its counted packets show it: the
/// payload bytes from the first sequence number seen to the highest, and
/// how many of those no counted packet carried (packets sent or received
/// whose samples were lost). The counted packets and bytes are left as
/// counted; this says by how much they fall short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqSpace {
    /// Payload bytes the sequence numbers cover, from the first payload
    /// byte (after the SYN when it was seen, else the first byte of the
    /// first packet seen with payload or a FIN) to the end of the highest
    /// payload seen; the SYN
    /// and FIN numbers are not payload.
    pub payload_bytes: u64,
    /// Of `payload_bytes`, those no counted packet carried.
    pub uncounted_bytes: u64,
    /// The figures start at this endpoint's SYN; false: at the first
    /// packet of it seen (a connection older than the daemon, or a lost
    /// SYN sample).
    pub from_syn: bool,
}

/// What is known of the process that owns a flow's socket.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// Short name (comm or basename of the executable).
    pub name: String,
    /// Command line.
    pub args: Vec<String>,
    /// Path of the executable.
    pub executable: String,
    /// Process start time.
    pub created: Option<SystemTime>,
    /// Credentials.
    pub creds: Option<Creds>,
    /// User name of `creds.uid`.
    pub user_name: Option<String>,
    /// Group name of `creds.gid`.
    pub group_name: Option<String>,
    /// Container id derived from the cgroup path.
    pub container_id: Option<String>,
    /// Kubernetes pod UID derived from the cgroup path.
    pub pod_uid: Option<String>,
}

/// Pid of `kthreadd`, the parent of every kernel thread.
pub const KTHREADD_PID: u32 = 2;

impl ProcessInfo {
    /// Whether this is a kernel thread: `kthreadd` or one of its children,
    /// with no command line (a user process has at least its `argv[0]`).
    pub fn is_kernel_thread(&self) -> bool {
        (self.pid == KTHREADD_PID || self.ppid == KTHREADD_PID) && self.args.is_empty()
    }
}

/// A flow as reported to subscribers: interim (`is_final == false`, counters
/// cumulative since the flow's start) or final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRecord {
    /// Stable id shared by all interim updates and the final record.
    pub id: u64,
    /// True for the last record of this flow.
    pub is_final: bool,
    /// True when the flow's start was observed.
    pub complete: bool,
    /// TCP or UDP.
    pub transport: Transport,
    /// Who initiated the flow.
    pub direction: FlowDirection,
    /// The local end (its counters are what the local socket sent).
    pub local: Endpoint,
    /// The remote end (its counters are what the local socket received).
    pub remote: Endpoint,
    /// Wall time of the first packet or event of the flow.
    pub start: SystemTime,
    /// Wall time of the last packet or event of the flow.
    pub end: SystemTime,
    /// Community ID v1 (seed 0) of the 5-tuple.
    pub community_id: String,
    /// Kernel address of the local `struct sock`.
    pub sock: SockAddr,
    /// Owning process, when known.
    pub process: Option<ProcessInfo>,
    /// How the counters were obtained.
    pub accounting: Accounting,
    /// Pod and container of the owning process, when the container runtime
    /// knows them.
    pub pod: Option<Arc<PodIdentity>>,
    /// Pod of the remote end, when its address is a pod's on this node.
    pub remote_pod: Option<Arc<PodIdentity>>,
}

impl FlowRecord {
    /// `ipv4` or `ipv6`, from the local address.
    pub fn network_type(&self) -> &'static str {
        match self.local.ip {
            IpAddr::V4(_) => "ipv4",
            IpAddr::V6(_) => "ipv6",
        }
    }
}

/// How a flow's counters were obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accounting {
    /// Every packet at the IP layer: IP bytes (headers included) and
    /// packets as the IP layer handled them.
    #[default]
    Packets,
    /// The TCP socket's own counters at the connection's end: payload
    /// bytes and TCP segments.
    SocketCounters,
    /// Socket-counter accounting, but the flow was reported before its
    /// socket's counters came (the daemon stopped, the flow was evicted,
    /// or the close sample was lost): its counters are zero, not measured.
    Uncounted,
}

/// A TCP socket's own counters (`struct tcp_sock`), as read by the close
/// probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpSockCounters {
    /// `bytes_received`: received sequence space (payload, plus one for a
    /// FIN).
    pub bytes_received: u64,
    /// `bytes_sent`: payload transmitted, retransmissions included.
    pub bytes_sent: u64,
    /// `bytes_retrans`: payload retransmitted.
    pub bytes_retrans: u64,
    /// `segs_in`: segments received.
    pub segs_in: u32,
    /// `segs_out`: segments sent.
    pub segs_out: u32,
    /// The socket received a FIN (`SOCK_DONE`).
    pub fin_received: bool,
}

impl TcpSockCounters {
    /// Payload bytes the socket sent, each byte once.
    pub fn payload_out(&self) -> u64 {
        self.bytes_sent.saturating_sub(self.bytes_retrans)
    }

    /// Payload bytes the socket received (the FIN's sequence number
    /// taken out).
    pub fn payload_in(&self) -> u64 {
        self.bytes_received
            .saturating_sub(u64::from(self.fin_received))
    }

    /// Whether the socket carried nothing at all.
    pub fn is_empty(&self) -> bool {
        self.segs_in == 0 && self.segs_out == 0
    }
}

/// What the flow engine hands to exporters.
#[derive(Debug, Clone)]
pub enum Output {
    /// A flow record, shared between subscribers.
    Flow(Arc<FlowRecord>),
    /// A loss notice.
    Loss(Loss),
}

/// The operating system, from `os-release`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsRelease {
    /// `NAME` (`Debian GNU/Linux`).
    pub name: String,
    /// `VERSION` (`12 (bookworm)`), else `VERSION_ID`.
    pub version: String,
    /// `VERSION_CODENAME` (`bookworm`).
    pub codename: String,
    /// `ID` (`debian`).
    pub platform: String,
    /// Derived from `ID` and `ID_LIKE` (`debian`, `redhat`, ...).
    pub family: String,
}

/// What is known of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Host name (`uname -n`).
    pub hostname: String,
    /// CPU architecture (`uname -m`).
    pub architecture: String,
    /// Kernel release (`uname -r`).
    pub kernel_release: String,
    /// Kernel version string (`uname -v`).
    pub kernel_version: String,
    /// Operating system, when an os-release file was found.
    pub os: Option<OsRelease>,
    /// `machine-id`, when present and well formed.
    pub machine_id: Option<String>,
    /// Whether the host is itself a container.
    pub containerized: bool,
    /// Addresses of the node's interfaces (no loopback, no IPv6
    /// link-local).
    pub ip_addresses: Vec<IpAddr>,
}
