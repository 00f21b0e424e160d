//! The node's own facts from the kernel: `uname` and the addresses of its
//! network interfaces (`getifaddrs`).

use std::net::IpAddr;

/// Most interface addresses reported (a node with more keeps the first).
pub const MAX_NODE_ADDRESSES: usize = 64;

/// What `uname(2)` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uname {
    /// `uname -m`.
    pub machine: String,
    /// `uname -r`.
    pub release: String,
    /// `uname -v`.
    pub version: String,
    /// `uname -n`.
    pub nodename: String,
}

/// `uname(2)`, when it answers.
pub fn uname() -> Option<Uname> {
    let u = nix::sys::utsname::uname().ok()?;
    Some(Uname {
        machine: u.machine().to_string_lossy().into_owned(),
        release: u.release().to_string_lossy().into_owned(),
        version: u.version().to_string_lossy().into_owned(),
        nodename: u.nodename().to_string_lossy().into_owned(),
    })
}

/// The addresses of the network interfaces of the daemon's network
/// namespace (the node's, for a daemon on the host network), loopback and
/// link-local IPv6 left out, without repeats, sorted, at most
/// [`MAX_NODE_ADDRESSES`]; empty when `getifaddrs` fails.
pub fn interface_addresses() -> Vec<IpAddr> {
    let Ok(ifs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut v: Vec<IpAddr> = ifs
        .filter_map(|i| {
            let a = i.address?;
            if let Some(s) = a.as_sockaddr_in() {
                Some(IpAddr::V4(s.ip()))
            } else {
                a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip()))
            }
        })
        .filter(|ip| !ip.is_loopback() && !is_link_local_v6(ip))
        .collect();
    v.sort_unstable();
    v.dedup();
    v.truncate(MAX_NODE_ADDRESSES);
    v
}

fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uname_and_addresses_of_this_machine() {
        let u = uname().expect("uname");
        assert!(!u.machine.is_empty() && !u.release.is_empty() && !u.version.is_empty());
        let a = interface_addresses();
        assert!(a.len() <= MAX_NODE_ADDRESSES);
        assert!(a
            .iter()
            .all(|ip| !ip.is_loopback() && !is_link_local_v6(ip)));
        assert!(
            a.windows(2).all(|w| w[0] < w[1]),
            "sorted, no repeats: {a:?}"
        );
        assert!(is_link_local_v6(&"fe80::1".parse().unwrap()));
        assert!(!is_link_local_v6(&"fd00::1".parse().unwrap()));
    }
}
