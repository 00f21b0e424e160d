//! Offset-guessing tests on the host (root; the host kernel has no kprobe
//! events, so the guesses themselves are verified in VMs by
//! `tests/vm/guess/run.py`). These cover selection, failure reporting,
//! cleanup, and the loopback address and credential system calls.

use std::fs;
use std::net::Ipv6Addr;
use std::path::Path;
use std::time::Duration;

use sockscope::config::{OffsetsMode, SocketConfig};
use sockscope::exit::ExitCode;
use sockscope::probe::check::load_offsets_from;
use sockscope::probe::group::{guess_group_name, remove_stale_instances};
use sockscope::probe::guess::net::{V6Mode, V6Pool};
use sockscope::probe::guess::MAX_REPETITIONS;
use sockscope::probe::{ProbeError, Provenance, Tracefs};
use sockscope::sys::trigger::{set_thread_ids, ThreadIds};

/// A directory that looks like tracefs to the probe stage but has no
/// `kprobe_events`, like a kernel without kprobes.
fn fake_tracefs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(
        dir.path().join("available_events"),
        "sched:sched_process_exec\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("available_filter_functions"),
        "tcp_connect\nudp_sendmsg\nudpv6_sendmsg\nraw_sendmsg\ninet_release\nip_output\nip_local_deliver\ncommit_creds\n",
    )
    .unwrap();
    fs::create_dir(dir.path().join("instances")).unwrap();
    dir
}

fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = c.id();
    c.wait().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} reused"
    );
    pid
}

#[test]
fn stale_guess_instances_of_dead_processes_are_removed() {
    let dir = fake_tracefs();
    let inst = dir.path().join("instances");
    let dead = format!("sockscope_{}_guess", dead_pid());
    let mine = guess_group_name();
    for d in [&dead, &mine, &"unrelated".to_string()] {
        fs::create_dir(inst.join(d)).unwrap();
    }
    let removed = remove_stale_instances(&Tracefs::at(dir.path().to_path_buf()));
    assert_eq!(removed, vec![dead.clone()]);
    assert!(!inst.join(&dead).exists());
    assert!(inst.join(&mine).exists(), "our own instance must stay");
    assert!(inst.join("unrelated").exists());
}

#[test]
fn auto_without_btf_guesses_and_reports_every_failure() {
    let dir = fake_tracefs();
    let tfs = Tracefs::at(dir.path().to_path_buf());
    let cfg = SocketConfig {
        offsets: OffsetsMode::Auto,
        guess_timeout: Duration::from_secs(2),
        ..SocketConfig::default()
    };
    let loaded = load_offsets_from(&cfg, &tfs, Path::new("/nonexistent/vmlinux"));
    let err = loaded
        .offsets
        .expect_err("no kprobe_events: guessing must fail");
    assert!(matches!(err, ProbeError::Guess { .. }), "{err}");
    assert_eq!(err.exit_code(), ExitCode::Guess.code());
    let names: Vec<&str> = loaded.guesses.iter().map(|g| g.name).collect();
    assert_eq!(
        names,
        [
            "sock_common_base",
            "sock_addresses",
            "sock_type",
            "proto_name",
            "sock_prot",
            "socket",
            "sk_buff_pointers",
            "sk_buff",
            "cred",
            "msghdr_pointers",
            "msghdr"
        ]
    );
    // The fixed one succeeds without probes, every traced one fails on the
    // missing kprobe_events (or on a dependency that failed before it).
    assert!(loaded.guesses[0].result.is_ok());
    for g in &loaded.guesses[1..] {
        let e = g.result.as_ref().expect_err(g.name);
        assert!(
            e.contains("kprobe_events") || e.contains("which was not guessed"),
            "{}: {e}",
            g.name
        );
        assert!(g.fields.is_empty());
        assert!(g.repetitions <= MAX_REPETITIONS);
        assert!(g.to_string().starts_with("FAILED"), "{g}");
    }
    assert!(
        !dir.path()
            .join("instances")
            .join(guess_group_name())
            .exists(),
        "the private ftrace instance must be removed after guessing"
    );
}

#[test]
fn selection_follows_socket_offsets() {
    let dir = fake_tracefs();
    let tfs = Tracefs::at(dir.path().to_path_buf());
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    let with = |mode| SocketConfig {
        offsets: mode,
        guess_timeout: Duration::from_secs(2),
        ..SocketConfig::default()
    };
    // auto with readable BTF: BTF, no guessing.
    let auto = load_offsets_from(&with(OffsetsMode::Auto), &tfs, btf);
    let o = auto
        .offsets
        .expect("host BTF must be readable: /sys/kernel/btf/vmlinux");
    assert!(matches!(o.provenance, Provenance::Btf(_)));
    assert!(auto.guesses.is_empty());
    // guess forces guessing even with BTF present.
    let forced = load_offsets_from(&with(OffsetsMode::Guess), &tfs, btf);
    assert!(!forced.guesses.is_empty());
    assert!(forced.offsets.is_err(), "no kprobes in the fake tracefs");
    // btf never guesses.
    let only = load_offsets_from(&with(OffsetsMode::Btf), &tfs, Path::new("/nonexistent"));
    assert!(matches!(only.offsets, Err(ProbeError::Btf { .. })));
    assert!(only.guesses.is_empty());
}

fn lo_has(addr: Ipv6Addr) -> bool {
    let hex: String = addr.octets().iter().map(|b| format!("{b:02x}")).collect();
    fs::read_to_string("/proc/net/if_inet6")
        .expect("/proc/net/if_inet6: the host must have IPv6")
        .lines()
        .any(|l| l.starts_with(&hex) && l.trim_end().ends_with(" lo"))
}

#[test]
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
fn ula_addresses_are_added_to_lo_and_removed_on_drop() {
    let mut pool = V6Pool::new(V6Mode::Ula).expect("lo must exist");
    let a = pool
        .fresh()
        .expect("adding an address to lo needs CAP_NET_ADMIN");
    let b = pool.fresh().expect("second address");
    assert_ne!(a, b);
    assert_eq!(a.octets()[0], 0xfd, "unique local address");
    assert!(lo_has(a) && lo_has(b), "{a} and {b} must be on lo");
    assert_eq!(pool.added(), &[a, b]);
    drop(pool);
    assert!(
        !lo_has(a) && !lo_has(b),
        "addresses must be removed on drop"
    );
}

#[test]
fn mapped_mode_touches_no_interface() {
    let mut pool = V6Pool::new(V6Mode::Mapped).unwrap();
    let a = pool.fresh().unwrap();
    let v4 = a.to_ipv4_mapped().expect("v4-mapped");
    assert_eq!(v4.octets()[0], 127);
    assert!(pool.added().is_empty());
}

#[test]
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
fn thread_ids_change_only_the_calling_thread() {
    let ids = ThreadIds {
        gid: [200_001, 200_002, 200_003, 200_004],
        uid: [300_001, 300_002, 300_003, 300_003],
    };
    let status = std::thread::spawn(move || {
        set_thread_ids(ids).expect("root may change ids");
        fs::read_to_string("/proc/thread-self/status").unwrap()
    })
    .join()
    .unwrap();
    let line = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
            .unwrap()
    };
    assert_eq!(line("Uid:"), "300001 300002 300003 300003");
    assert_eq!(line("Gid:"), "200001 200002 200003 200004");
    let me = fs::read_to_string("/proc/thread-self/status").unwrap();
    let uid = me.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !uid.contains("300001"),
        "other threads keep their ids: {uid}"
    );
}
