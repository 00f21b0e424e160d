//! The node itself: what its documents say about the host they come from
//! (ECS `host.*`) and what `GetStatus` reports as node information. Read
//! once at start from the host root (`socket.host_root`), the proc root
//! and the kernel.
//!
//! - operating system: `etc/os-release` (or `usr/lib/os-release`) of the
//!   host root; the family is derived from `ID` and `ID_LIKE`, as the
//!   Beats name it (`debian`, `redhat`, `suse`, `arch`, `alpine`), else the
//!   `ID` itself;
//! - `host.id`: `etc/machine-id` (or `var/lib/dbus/machine-id`), 32 hex
//!   digits, else absent;
//! - containerized: the host root holds `.dockerenv` or
//!   `run/.containerenv`, or the proc root's pid 1 runs in a container
//!   (its cgroup names one): the "host" is then itself a container;
//! - kernel and architecture from `uname`, the interface addresses of the
//!   daemon's network namespace (the node's on the host network).

use std::path::Path;

use crate::enrich::container::parse_cgroup;
pub use crate::model::{NodeInfo, OsRelease};
use crate::sys::node;

/// Largest os-release or machine-id file read.
const MAX_FACT_FILE: u64 = 64 * 1024;
/// Hex digits of a machine id.
const MACHINE_ID_LEN: usize = 32;

/// Reads the node's facts; whatever cannot be read is left empty.
pub fn read_node(host_root: &Path, proc_root: &Path) -> NodeInfo {
    let u = node::uname().unwrap_or_default();
    let os = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| read_small(&host_root.join(p)))
        .map(|t| parse_os_release(&t));
    let machine_id = ["etc/machine-id", "var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| read_small(&host_root.join(p)).and_then(|t| machine_id(&t)));
    NodeInfo {
        hostname: u.nodename,
        architecture: u.machine,
        kernel_release: u.release,
        kernel_version: u.version,
        os,
        machine_id,
        containerized: containerized(host_root, proc_root),
        ip_addresses: node::interface_addresses(),
    }
}

/// A small text file, or None when absent, unreadable or too large.
fn read_small(p: &Path) -> Option<String> {
    let meta = std::fs::metadata(p).ok()?;
    if !meta.is_file() || meta.len() > MAX_FACT_FILE {
        return None;
    }
    std::fs::read_to_string(p).ok()
}

/// The value of one `KEY=value` line: quotes removed, `\`-escapes undone.
fn unquote(v: &str) -> String {
    let v = v.trim();
    let inner = match (v.chars().next(), v.chars().last()) {
        (Some(q @ ('"' | '\'')), Some(e)) if v.len() >= 2 && e == q => &v[1..v.len() - 1],
        _ => v,
    };
    let mut out = String::with_capacity(inner.len());
    let mut esc = false;
    for c in inner.chars() {
        if esc {
            out.push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses an os-release file (see os-release(5)).
pub fn parse_os_release(text: &str) -> OsRelease {
    let mut os = OsRelease::default();
    let (mut version_id, mut id_like) = (String::new(), String::new());
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = unquote(v);
        match k.trim() {
            "NAME" => os.name = v,
            "VERSION" => os.version = v,
            "VERSION_ID" => version_id = v,
            "VERSION_CODENAME" => os.codename = v,
            "ID" => os.platform = v,
            "ID_LIKE" => id_like = v,
            _ => {}
        }
    }
    if os.version.is_empty() {
        os.version = version_id;
    }
    os.family = family(&os.platform, &id_like);
    os
}

/// The family of a distribution, from its `ID` and `ID_LIKE`.
fn family(id: &str, id_like: &str) -> String {
    const FAMILIES: [(&str, &[&str]); 5] = [
        ("debian", &["debian", "ubuntu", "raspbian", "linuxmint"]),
        (
            "redhat",
            &[
                "rhel",
                "fedora",
                "centos",
                "rocky",
                "almalinux",
                "amzn",
                "ol",
            ],
        ),
        ("suse", &["suse", "sles", "opensuse", "opensuse-leap"]),
        ("arch", &["arch", "manjaro"]),
        ("alpine", &["alpine"]),
    ];
    let names: Vec<&str> = std::iter::once(id)
        .chain(id_like.split_whitespace())
        .collect();
    for name in &names {
        if let Some((f, _)) = FAMILIES.iter().find(|(_, ids)| ids.contains(name)) {
            return (*f).to_string();
        }
    }
    id.to_string()
}

/// A machine id: 32 lowercase hex digits on the first line.
fn machine_id(text: &str) -> Option<String> {
    let id = text.lines().next()?.trim().to_ascii_lowercase();
    (id.len() == MACHINE_ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// Whether the host root is a container's: a runtime's marker file in it,
/// or a container named by the cgroup of the proc root's pid 1.
fn containerized(host_root: &Path, proc_root: &Path) -> bool {
    let marker = [".dockerenv", "run/.containerenv"]
        .iter()
        .any(|m| host_root.join(m).exists());
    marker
        || read_small(&proc_root.join("1/cgroup"))
            .is_some_and(|t| parse_cgroup(&t).container_id.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str =
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
        VERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n";

    #[test]
    fn os_release_fields_and_family() {
        let os = parse_os_release(DEBIAN);
        assert_eq!(
            (
                os.name.as_str(),
                os.version.as_str(),
                os.codename.as_str(),
                os.platform.as_str(),
                os.family.as_str()
            ),
            (
                "Debian GNU/Linux",
                "12 (bookworm)",
                "bookworm",
                "debian",
                "debian"
            )
        );
        let rocky = parse_os_release(
            "# comment\nNAME='Rocky Linux'\nVERSION_ID=\"9.4\"\nID=rocky\nID_LIKE=\"rhel centos fedora\"\n",
        );
        assert_eq!(
            (rocky.version.as_str(), rocky.family.as_str()),
            ("9.4", "redhat")
        );
        let mint = parse_os_release(
            "ID=linuxmint\nID_LIKE=\"ubuntu debian\"\nNAME=\"Linux \\\"Mint\\\"\"\n",
        );
        assert_eq!(
            (mint.family.as_str(), mint.name.as_str()),
            ("debian", "Linux \"Mint\"")
        );
        let odd = parse_os_release("ID=nixos\ngarbage line\n=\nVERSION=\n");
        assert_eq!((odd.family.as_str(), odd.version.as_str()), ("nixos", ""));
    }

    #[test]
    fn machine_ids_are_32_hex_digits() {
        assert_eq!(
            machine_id("0123456789ABCDEF0123456789abcdef\n").as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(machine_id("uninitialized\n"), None);
        assert_eq!(machine_id(""), None);
        assert_eq!(machine_id("0123456789abcdef0123456789abcdeg"), None);
    }

    #[test]
    fn node_facts_from_a_host_root() {
        let root = tempfile::tempdir().expect("tempdir");
        let proc = root.path().join("proc");
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(proc.join("1")).unwrap();
        std::fs::write(root.path().join("etc/os-release"), DEBIAN).unwrap();
        std::fs::write(
            root.path().join("etc/machine-id"),
            "5d3c1f2a8b9e4c7da6f50e1d2c3b4a59\n",
        )
        .unwrap();
        std::fs::write(proc.join("1/cgroup"), "0::/init.scope\n").unwrap();
        let n = read_node(root.path(), &proc);
        assert_eq!(n.os.as_ref().map(|o| o.codename.as_str()), Some("bookworm"));
        assert_eq!(
            n.machine_id.as_deref(),
            Some("5d3c1f2a8b9e4c7da6f50e1d2c3b4a59")
        );
        assert!(!n.containerized);
        assert!(!n.kernel_release.is_empty() && !n.architecture.is_empty());
        // A container's pid 1, then a runtime's marker.
        std::fs::write(
            proc.join("1/cgroup"),
            "0::/system.slice/docker-3f1b5c2e9a8d7f6e5d4c3b2a1908f7e6d5c4b3a29180f7e6d5c4b3a291807f6e.scope\n",
        )
        .unwrap();
        assert!(read_node(root.path(), &proc).containerized);
        std::fs::write(proc.join("1/cgroup"), "0::/\n").unwrap();
        std::fs::create_dir_all(root.path().join("run")).unwrap();
        std::fs::write(root.path().join("run/.containerenv"), "").unwrap();
        assert!(read_node(root.path(), &proc).containerized);
        // Nothing there: empty, not an error.
        let empty = tempfile::tempdir().expect("tempdir");
        let n = read_node(empty.path(), &empty.path().join("proc"));
        assert_eq!((n.os, n.machine_id, n.containerized), (None, None, false));
    }
}
