//! Probe-stage tests against the host kernel (needs root and tracefs; the
//! host kernel has BTF but no kprobe events).

use std::path::Path;

use sockscope::config::SocketConfig;
use sockscope::exit::ExitCode;
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
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
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
    assert_eq!(err.exit_code(), ExitCode::KprobesUnsupported.code());
    assert_eq!(ExitCode::from(&err), ExitCode::KprobesUnsupported);
}

#[test]
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
fn check_and_serve_exit_with_the_kprobe_code() {
    for command in ["check", "serve"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sockscope"))
            .args(["-E", "server.unix_socket=", command])
            .output()
            .expect("run sockscope");
        assert_eq!(
            out.status.code(),
            Some(ExitCode::KprobesUnsupported.code()),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

mod spec {
    use std::collections::HashSet;
    use std::path::Path;

    use sockscope::probe::group::MAX_NAME_LEN;
    use sockscope::probe::spec::{KRETPROBE_MAXACTIVE, MAX_FETCHARGS};
    use sockscope::probe::{probe_set, resolve, Attach, Offsets, ProbeError};

    fn offsets() -> Offsets {
        Offsets::from_btf(Path::new("/sys/kernel/btf/vmlinux")).expect("host BTF")
    }

    fn all_first_alternatives() -> HashSet<String> {
        probe_set(&offsets())
            .iter()
            .filter_map(|s| match s.attach {
                Attach::Kprobe(a) | Attach::Kretprobe(a) => a.first().map(|f| f.to_string()),
                Attach::Tracepoint { .. } => None,
            })
            .collect()
    }

    #[test]
    fn specs_respect_kernel_limits() {
        let set = probe_set(&offsets());
        let mut names = HashSet::new();
        for s in &set {
            assert!(names.insert(s.name), "duplicate probe name {}", s.name);
            assert!(s.fetchargs.split_whitespace().count() <= MAX_FETCHARGS);
            // group "sockscope_<pid>" + "/" + name stays within limits.
            assert!(s.name.len() <= MAX_NAME_LEN);
            if let Attach::Kprobe(a) | Attach::Kretprobe(a) = s.attach {
                assert!(!a.is_empty(), "{} has no function", s.name);
            }
        }
        let mut untasked: Vec<&str> = set
            .iter()
            .filter(|s| !s.task_context)
            .map(|s| s.name)
            .collect();
        untasked.sort_unstable();
        assert_eq!(
            untasked,
            ["ip6_in", "ip_in", "udp_in"],
            "only the ingress packet probes lack task context"
        );
    }

    #[test]
    fn definitions_use_btf_offsets() {
        let off = offsets();
        let avail = all_first_alternatives();
        let probes = resolve(probe_set(&off), &avail, true, Path::new("x")).unwrap();
        let def = |n: &str| {
            probes
                .iter()
                .find(|p| p.spec.name == n)
                .and_then(|p| p.definition("sockscope_1"))
                .unwrap()
        };
        assert_eq!(
            def("ip_out"),
            format!(
                "p:sockscope_1/ip_out ip_output sk=$arg2:x64 len=+{}($arg3):u32 hdr=+0(+{}($arg3)):u8[64]",
                off.skb_len.offset, off.skb_data.offset
            )
        );
        assert_eq!(
            def("udp_in"),
            format!(
                "p:sockscope_1/udp_in __udp_enqueue_schedule_skb sk=$arg1:x64 len=+{}($arg2):u32 hdr=-64(+{}($arg2)):u8[64]",
                off.skb_len.offset, off.skb_data.offset
            )
        );
        assert!(def("tcp_accept").starts_with(&format!(
            "r{KRETPROBE_MAXACTIVE}:sockscope_1/tcp_accept inet_csk_accept sk=$retval:x64 family=+{}($retval):u16",
            off.skc_family.offset
        )));
        assert!(def("sock_close").contains(&format!("sk=+{}($arg1):x64", off.socket_sk.offset)));
        assert!(def("creds").contains(&format!("euid=+{}($arg1):u32", off.cred_euid.offset)));
        let tp = probes.iter().find(|p| p.spec.name == "exec").unwrap();
        assert_eq!(tp.definition("sockscope_1"), None);
    }

    #[test]
    fn resolution_takes_first_present_alternative_and_names_missing_ones() {
        let off = offsets();
        let mut avail = all_first_alternatives();
        avail.remove("sock_init_data");
        avail.insert("sock_init_data_uid".into());
        let probes = resolve(probe_set(&off), &avail, true, Path::new("x")).unwrap();
        let create = probes
            .iter()
            .find(|p| p.spec.name == "sock_create")
            .unwrap();
        assert_eq!(create.function, Some("sock_init_data_uid"));

        avail.remove("ip6_input");
        let v4_only = resolve(probe_set(&off), &avail, false, Path::new("x")).unwrap();
        assert!(v4_only.iter().all(|p| !p.spec.ipv6_only));
        let err = resolve(probe_set(&off), &avail, true, Path::new("x")).unwrap_err();
        assert!(
            matches!(
                err,
                ProbeError::NoFunction {
                    probe: "ip6_in",
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
fn check_reports_every_requirement_and_setup_fails_on_kprobes() {
    let cfg = SocketConfig::default();
    let items = sockscope::probe::check(&cfg);
    let status = |name: &str| {
        items
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no check item {name}: {items:?}"))
    };
    use sockscope::probe::CheckStatus;
    assert_eq!(status("tracefs").status, CheckStatus::Ok);
    assert_eq!(status("kprobe events").status, CheckStatus::Fail);
    assert_ne!(status("kprobe events").exit_code, 0);
    assert_eq!(status("offsets").status, CheckStatus::Ok);
    assert!(
        status("offsets").detail.starts_with("offsets from btf"),
        "auto with readable BTF must not guess: {}",
        status("offsets").detail
    );
    assert!(!items.iter().any(|i| i.name.starts_with("guess ")));
    assert_eq!(status("CAP_SYS_ADMIN").status, CheckStatus::Ok);
    assert_eq!(status("probe ip_out").detail, "ip_output");
    assert_eq!(status("probe tcp_accept").detail, "inet_csk_accept");
    assert_eq!(status("probe exit").detail, "tracepoint");
    let err = sockscope::probe::setup(&cfg).unwrap_err();
    assert!(
        matches!(err, ProbeError::KprobesUnsupported { .. }),
        "{err}"
    );
    assert_eq!(err.exit_code(), status("kprobe events").exit_code);
}

#[test]
fn configured_tracefs_path_must_be_a_tracefs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SocketConfig {
        tracefs_path: Some(dir.path().to_path_buf()),
        ..SocketConfig::default()
    };
    let err = Tracefs::open(&cfg).unwrap_err();
    assert!(
        matches!(err, ProbeError::TracefsPathInvalid { .. }),
        "{err}"
    );
}
