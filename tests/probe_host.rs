//! Probe-stage tests against the host kernel (needs root and tracefs; the
//! host kernel has BTF but no kprobe events).

use std::path::Path;

use sockscope::config::SocketConfig;
use sockscope::probe::{Offsets, ProbeError, Tracefs};

#[test]
fn host_btf_offsets_resolve_and_match_uapi() {
    let off = Offsets::from_btf(Path::new("/sys/kernel/btf/vmlinux"))
        .expect("host BTF must be readable: /sys/kernel/btf/vmlinux");
    // UAPI layouts are fixed: a wrong member walk would not land on these.
    assert_eq!((off.sin_port.offset, off.sin_port.size), (2, 2));
    assert_eq!((off.sin_addr.offset, off.sin_addr.size), (4, 4));
    assert_eq!((off.sin6_port.offset, off.sin6_port.size), (2, 2));
    assert_eq!((off.sin6_addr.offset, off.sin6_addr.size), (8, 16));
    // sock_common layout facts shared by every kernel since 3.x.
    assert_eq!(off.sk_common.offset, 0);
    assert_eq!(off.skc_daddr.offset, 0, "skc_daddr opens sock_common");
    assert_eq!(off.skc_rcv_saddr.offset, 4);
    assert_eq!(off.skc_dport.offset, 12);
    assert_eq!(off.skc_num.offset, 14);
    assert_eq!(off.skc_family.size, 2);
    assert_eq!(off.skc_v6_daddr.size, 16);
    assert_eq!(off.skc_v6_rcv_saddr.size, 16);
    assert_eq!(off.skc_v6_rcv_saddr.offset, off.skc_v6_daddr.offset + 16);
    assert_eq!(off.skb_len.size, 4);
    assert_eq!(off.skb_data.size, 8);
    assert_eq!(off.skb_head.size, 8);
    assert_eq!(off.skb_network_header.size, 2);
    assert_eq!(off.cred_uid.size, 4);
    assert_eq!(off.cred_gid.offset, off.cred_uid.offset + 4);
    assert_eq!(off.cred_euid.offset, off.cred_uid.offset + 16);
    assert_eq!(off.cred_egid.offset, off.cred_uid.offset + 20);
    assert_eq!(off.msg_name.offset, 0);
    assert_eq!(off.msg_namelen.offset, 8);
    assert_eq!(off.proto_name.size, 32);
    let printed = off.to_string();
    assert!(printed.contains("sk_buff.network_header"), "{printed}");
}

#[test]
fn missing_btf_member_is_reported() {
    let b = sockscope::probe::btf::BtfFile::open(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
    let err = b.field("sock_common", &["no_such_member"]).unwrap_err();
    assert!(matches!(err, ProbeError::BtfMember { .. }), "{err}");
    assert_eq!(b.field("sk_buff", &["len"]).unwrap().size, 4);
}

#[test]
fn host_without_kprobes_fails_with_kprobe_error() {
    let tfs = Tracefs::open(&SocketConfig::default()).expect("host must have tracefs");
    let err = tfs
        .check_kprobes()
        .expect_err("host kernel has no kprobe events");
    assert!(
        matches!(err, ProbeError::KprobesUnsupported { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("CONFIG_KPROBE_EVENTS"), "{err}");
    assert!(err.to_string().contains("kprobe_events missing"), "{err}");
    assert_ne!(err.exit_code(), 0);
}
