//! The machine's TCP sockets when the daemon starts, and their owners.
//!
//! Taken once, right after the probes are installed, so every connection
//! is known either to the probes (opened later) or to this snapshot
//! (opened before), or to both. Read from `/proc/net/tcp` and
//! `/proc/net/tcp6` (state, both ends, inode) and the socket inodes under
//! `/proc/<pid>/fd` (the owning process). The flow engine uses it for the
//! flows whose open it did not see: an established connection gets its
//! owner and, when one end is a local listener, its direction; a
//! connection accepted from a listener whose `accept` began before the
//! probes gets the listener's owner.
//!
//! Bounded: at most [`MAX_SNAPSHOT_SOCKETS`] sockets and
//! [`MAX_SNAPSHOT_FDS`] descriptors are read, and the descriptor scan stops
//! after [`SNAPSHOT_TIME_BUDGET`]; what was cut short is counted in the
//! snapshot's [`SnapshotStats`] and logged.

use std::collections::HashMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

/// Most sockets read from `/proc/net/tcp{,6}`.
pub const MAX_SNAPSHOT_SOCKETS: usize = 1 << 20;
/// Most file descriptors looked at under `/proc/*/fd`.
pub const MAX_SNAPSHOT_FDS: usize = 4 << 20;
/// Longest the descriptor scan may take.
pub const SNAPSHOT_TIME_BUDGET: Duration = Duration::from_secs(10);
/// `TCP_ESTABLISHED` in `/proc/net/tcp`'s `st` column.
pub const TCP_ESTABLISHED: u8 = 1;
/// `TCP_LISTEN` in `/proc/net/tcp`'s `st` column.
pub const TCP_LISTEN: u8 = 10;

/// One TCP socket of the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapSocket {
    /// Local address and port.
    pub local: SocketAddr,
    /// Remote address and port (unspecified for a listener).
    pub remote: SocketAddr,
    /// Kernel TCP state (`TCP_ESTABLISHED`, `TCP_LISTEN`, …).
    pub state: u8,
    /// Socket inode (0 for sockets no file refers to, e.g. TIME_WAIT).
    pub inode: u64,
    /// Process whose descriptor refers to the inode, when found (the
    /// lowest pid when several share it).
    pub pid: Option<u32>,
}

/// How much of the machine the snapshot covered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Sockets read.
    pub sockets: usize,
    /// Sockets left out beyond [`MAX_SNAPSHOT_SOCKETS`].
    pub sockets_cut: usize,
    /// Lines of `/proc/net/tcp{,6}` that did not parse.
    pub bad_lines: usize,
    /// Descriptors looked at.
    pub fds: usize,
    /// Whether the descriptor scan stopped early (time or descriptor bound).
    pub fd_scan_cut: bool,
    /// Sockets whose owner was found.
    pub owned: usize,
    /// How long it took.
    pub took: Duration,
}

/// The TCP sockets at start.
#[derive(Debug, Clone, Default)]
pub struct SocketSnapshot {
    /// The sockets.
    pub sockets: Vec<SnapSocket>,
    /// Coverage.
    pub stats: SnapshotStats,
}

/// A `/proc/net/tcp` address: 8 (IPv4) or 32 (IPv6) hex digits, each
/// 32-bit word printed in the kernel's byte order (little-endian here),
/// then `:` and the port in hex.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_le_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(b);
            // IPv4-mapped addresses of dual-stack sockets, as IPv4 (the
            // decoder canonicalises them the same way).
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// One line of `/proc/net/tcp{,6}` (not the header).
pub fn parse_tcp_line(line: &str) -> Option<SnapSocket> {
    let mut f = line.split_whitespace();
    let _slot = f.next()?;
    let local = parse_addr(f.next()?)?;
    let remote = parse_addr(f.next()?)?;
    let state = u8::from_str_radix(f.next()?, 16).ok()?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt, uid, timeout, inode.
    let inode = f.nth(5)?.parse().ok()?;
    Some(SnapSocket {
        local,
        remote,
        state,
        inode,
        pid: None,
    })
}

/// Parses a whole `/proc/net/tcp{,6}` text into `out`, up to `max`
/// sockets; returns (bad lines, sockets left out).
pub fn parse_tcp_table(text: &str, out: &mut Vec<SnapSocket>, max: usize) -> (usize, usize) {
    let (mut bad, mut cut) = (0, 0);
    for line in text.lines().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        match parse_tcp_line(line) {
            Some(_) if out.len() >= max => cut += 1,
            Some(s) => out.push(s),
            None => bad += 1,
        }
    }
    (bad, cut)
}

/// The inode of a `/proc/<pid>/fd/<n>` link target `socket:[inode]`.
pub fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Takes the snapshot from the proc filesystem at `proc_root`. A missing
/// table (no IPv6) is skipped; an unreadable process is skipped (it may
/// have exited).
pub fn take(proc_root: &Path) -> SocketSnapshot {
    let t0 = Instant::now();
    let mut snap = SocketSnapshot::default();
    for table in ["net/tcp", "net/tcp6"] {
        let Ok(text) = fs::read_to_string(proc_root.join(table)) else {
            continue;
        };
        let (bad, cut) = parse_tcp_table(&text, &mut snap.sockets, MAX_SNAPSHOT_SOCKETS);
        snap.stats.bad_lines += bad;
        snap.stats.sockets_cut += cut;
    }
    snap.stats.sockets = snap.sockets.len();
    let mut by_inode: HashMap<u64, usize> = snap
        .sockets
        .iter()
        .enumerate()
        .filter(|(_, s)| s.inode != 0)
        .map(|(i, s)| (s.inode, i))
        .collect();
    let deadline = t0 + SNAPSHOT_TIME_BUDGET;
    let mut pids: Vec<u32> = match fs::read_dir(proc_root) {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    // Lowest pid first: of processes sharing a socket (a pre-forked
    // server's listener), the parent usually comes first.
    pids.sort_unstable();
    'scan: for pid in pids {
        if by_inode.is_empty() {
            break;
        }
        let Ok(fds) = fs::read_dir(proc_root.join(pid.to_string()).join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            snap.stats.fds += 1;
            if snap.stats.fds > MAX_SNAPSHOT_FDS || Instant::now() > deadline {
                snap.stats.fd_scan_cut = true;
                break 'scan;
            }
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target.to_str().and_then(socket_inode) else {
                continue;
            };
            if let Some(i) = by_inode.remove(&inode) {
                snap.sockets[i].pid = Some(pid);
                snap.stats.owned += 1;
            }
        }
    }
    snap.stats.took = t0.elapsed();
    snap
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as 6.1 prints them: a listener on 127.0.0.1:8080, an
    // established connection to it, and an IPv6 listener on [::]:22.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 21563 1 0000000000000000 100 0 0 10 0
   1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 21600 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 15012 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000F02000A:0016 0000000000000000FFFF0000A002000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 15999 1 0000000000000000 20 4 30 10 -1
   2: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:B0C4 01 00000000:00000000 00:00000000 00000000  1000        0 16000 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn ipv4_lines_parse() {
        let mut v = Vec::new();
        assert_eq!(parse_tcp_table(TCP, &mut v, 10), (0, 0));
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(v[0].remote, "0.0.0.0:0".parse().unwrap());
        assert_eq!((v[0].state, v[0].inode), (TCP_LISTEN, 21563));
        assert_eq!(v[1].local, "127.0.0.1:50000".parse().unwrap());
        assert_eq!(v[1].remote, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((v[1].state, v[1].inode), (TCP_ESTABLISHED, 21600));
    }

    #[test]
    fn ipv6_lines_parse_and_mapped_addresses_are_ipv4() {
        let mut v = Vec::new();
        assert_eq!(parse_tcp_table(TCP6, &mut v, 10), (0, 0));
        assert_eq!(v[0].local, "[::]:22".parse().unwrap());
        assert_eq!(v[1].local, "10.0.2.15:22".parse().unwrap());
        assert_eq!(v[1].remote, "10.0.2.160:54321".parse().unwrap());
        assert_eq!(v[2].local, "[::1]:8080".parse().unwrap());
        assert_eq!(v[2].remote, "[::1]:45252".parse().unwrap());
    }

    #[test]
    fn bad_lines_are_counted_and_the_bound_holds() {
        let mut v = Vec::new();
        let text = format!("{TCP}   2: garbage\n   3: 0100007F:ZZZZ 0:0 01\n");
        assert_eq!(parse_tcp_table(&text, &mut v, 1), (2, 1));
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn socket_links_give_their_inode() {
        assert_eq!(socket_inode("socket:[21563]"), Some(21563));
        assert_eq!(socket_inode("pipe:[21563]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    #[test]
    fn this_process_owns_its_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let snap = take(Path::new("/proc"));
        let me = snap
            .sockets
            .iter()
            .find(|s| s.local == addr && s.state == TCP_LISTEN)
            .expect("the listener is in the snapshot");
        assert_eq!(me.pid, Some(std::process::id()));
        assert!(snap.stats.owned >= 1);
    }
}
