//! Container id and Kubernetes pod UID from the text of `/proc/<pid>/cgroup`.
//!
//! Both cgroup v1 (`N:controllers:/path`) and v2 (`0::/path`) lines are
//! understood. The container id is the last path component that is, after
//! removing a runtime prefix (`docker-`, `cri-containerd-`, `crio-`,
//! `libpod-`, `containerd-`) and a `.scope` suffix, 64 hex digits. Runtime
//! monitor scopes (`crio-conmon-…`, `libpod-conmon-…`) are not containers.
//! The pod UID comes from a `pod<uid>` component (cgroupfs driver, dashes)
//! or a `kubepods-…-pod<uid>.slice` component (systemd driver, where the
//! dashes of the UID are written as underscores).

/// Length of a container id in hex digits.
pub const CONTAINER_ID_LEN: usize = 64;
/// Length of a textual UUID (8-4-4-4-12).
const UUID_LEN: usize = 36;

/// Runtime prefixes that precede a container id in a path component.
const RUNTIME_PREFIXES: &[&str] = &[
    "docker-",
    "cri-containerd-",
    "crio-",
    "libpod-",
    "containerd-",
];
/// Prefixes of scopes that belong to a runtime's monitor, not a container.
const MONITOR_PREFIXES: &[&str] = &["crio-conmon-", "libpod-conmon-"];

/// What a cgroup file says about the container a process runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Full 64-hex-digit container id.
    pub container_id: Option<String>,
    /// Kubernetes pod UID, dashed form.
    pub pod_uid: Option<String>,
}

fn is_hex_id(s: &str) -> bool {
    s.len() == CONTAINER_ID_LEN && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_uuid(s: &str) -> bool {
    s.len() == UUID_LEN
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Container id in one path component, if any.
fn component_container_id(comp: &str) -> Option<&str> {
    if MONITOR_PREFIXES.iter().any(|p| comp.starts_with(p)) {
        return None;
    }
    let comp = comp.strip_suffix(".scope").unwrap_or(comp);
    let id = RUNTIME_PREFIXES
        .iter()
        .find_map(|p| comp.strip_prefix(p))
        .unwrap_or(comp);
    is_hex_id(id).then_some(id)
}

/// Pod UID in one path component, if any.
fn component_pod_uid(comp: &str) -> Option<String> {
    if let Some(slice) = comp.strip_suffix(".slice") {
        // systemd driver: kubepods-burstable-pod<uid_with_underscores>.slice
        let idx = slice.rfind("-pod")?;
        let uid = slice[idx + 4..].replace('_', "-");
        return is_uuid(&uid).then_some(uid);
    }
    // cgroupfs driver: pod<uid>
    let uid = comp.strip_prefix("pod")?;
    is_uuid(uid).then(|| uid.to_string())
}

/// Parses the text of a `/proc/<pid>/cgroup` file.
pub fn parse_cgroup(text: &str) -> ContainerInfo {
    let mut info = ContainerInfo::default();
    for line in text.lines() {
        // hierarchy-id:controllers:path; the path may itself contain ':'.
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        for comp in path.split('/').rev() {
            if info.container_id.is_none() {
                if let Some(id) = component_container_id(comp) {
                    info.container_id = Some(id.to_ascii_lowercase());
                }
            }
            if info.pod_uid.is_none() {
                info.pod_uid = component_pod_uid(comp);
            }
        }
        if info.container_id.is_some() && info.pod_uid.is_some() {
            break;
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1b5c2e9a8d7f6e5d4c3b2a1908f7e6d5c4b3a29180f7e6d5c4b3a291807f6e";
    const UID: &str = "5d3c1f2a-8b9e-4c7d-a6f5-0e1d2c3b4a59";

    #[test]
    fn docker_cgroup_v1() {
        let text = format!(
            "12:memory:/docker/{ID}\n11:cpu,cpuacct:/docker/{ID}\n1:name=systemd:/docker/{ID}\n"
        );
        let got = parse_cgroup(&text);
        assert_eq!(got.container_id.as_deref(), Some(ID));
        assert_eq!(got.pod_uid, None);
    }

    #[test]
    fn docker_cgroup_v2_systemd() {
        let got = parse_cgroup(&format!("0::/system.slice/docker-{ID}.scope\n"));
        assert_eq!(got.container_id.as_deref(), Some(ID));
    }

    #[test]
    fn containerd_kubelet_systemd_slice() {
        let uid_ = UID.replace('-', "_");
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
        );
        let got = parse_cgroup(&text);
        assert_eq!(got.container_id.as_deref(), Some(ID));
        assert_eq!(got.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn containerd_kubelet_cgroupfs_v1() {
        let text = format!("4:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{ID}\n");
        let got = parse_cgroup(&text);
        assert_eq!(got.container_id.as_deref(), Some(ID));
        assert_eq!(got.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn crio_guaranteed_pod() {
        let uid_ = UID.replace('-', "_");
        let text = format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope\n");
        let got = parse_cgroup(&text);
        assert_eq!(got.container_id.as_deref(), Some(ID));
        assert_eq!(got.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn crio_conmon_is_not_a_container() {
        let uid_ = UID.replace('-', "_");
        let text = format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{ID}.scope\n");
        let got = parse_cgroup(&text);
        assert_eq!(got.container_id, None);
        assert_eq!(got.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn podman_rootless_and_rootful() {
        let rootless = format!(
            "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n"
        );
        assert_eq!(parse_cgroup(&rootless).container_id.as_deref(), Some(ID));
        let rootful = format!("0::/machine.slice/libpod-{ID}.scope\n");
        assert_eq!(parse_cgroup(&rootful).container_id.as_deref(), Some(ID));
        let conmon = format!("0::/machine.slice/libpod-conmon-{ID}.scope\n");
        assert_eq!(parse_cgroup(&conmon).container_id, None);
    }

    #[test]
    fn host_process_and_garbage() {
        assert_eq!(
            parse_cgroup("0::/user.slice/user-1000.slice/session-2.scope\n"),
            ContainerInfo::default()
        );
        assert_eq!(parse_cgroup(""), ContainerInfo::default());
        assert_eq!(
            parse_cgroup("no colons here\n::\n0::/pod1234\n"),
            ContainerInfo::default()
        );
        // 63 hex digits is not an id.
        let short = &ID[..63];
        assert_eq!(
            parse_cgroup(&format!("0::/docker/{short}\n")).container_id,
            None
        );
    }
}
