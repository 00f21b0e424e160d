//! Runs inside a VM booted on a Debian kernel: sets the probe stage up with
//! BTF and with guessed offsets, compares every offset, checks that the
//! guess probes, instance and loopback addresses are gone afterwards, then
//! hides BTF (bind mount over /sys/kernel/btf/vmlinux) and checks that
//! `socket.offsets: auto` falls back to guessing. Lines starting with `@@`
//! are parsed by `run.py` on the host.

use std::path::Path;
use std::time::Instant;

use sockscope::config::{OffsetsMode, SocketConfig};
use sockscope::probe::{self, Field, Offsets, Provenance};

fn cfg(mode: OffsetsMode) -> SocketConfig {
    SocketConfig {
        offsets: mode,
        ..SocketConfig::default()
    }
}

/// Compares every field; `sock.__sk_common` by offset only (its size is
/// not observable by guessing). Returns the number of differences.
fn diff(btf: &Offsets, guessed: &Offsets, label: &str) -> usize {
    let mut a: Vec<(&str, Field)> = btf.fields().to_vec();
    a.push(("sockaddr_in6.sin6_addr", btf.sin6_addr));
    let mut b: Vec<(&str, Field)> = guessed.fields().to_vec();
    b.push(("sockaddr_in6.sin6_addr", guessed.sin6_addr));
    let mut bad = 0;
    for ((name, x), (_, y)) in a.iter().zip(b.iter()) {
        let same = if *name == "sock.__sk_common" {
            x.offset == y.offset
        } else {
            x == y
        };
        println!(
            "@@FIELD {label} {name} btf={}/{}/{:?} guess={}/{}/{:?} {}",
            x.offset,
            x.size,
            x.bits,
            y.offset,
            y.size,
            y.bits,
            if same { "ok" } else { "DIFF" }
        );
        if !same {
            bad += 1;
        }
    }
    println!("@@COMPARED {label} fields={} diffs={bad}", a.len());
    bad
}

fn leftovers(tfs: &probe::Tracefs) -> (bool, bool, usize) {
    let kev = std::fs::read_to_string(tfs.kprobe_events()).unwrap_or_default();
    let probes = kev.lines().any(|l| l.contains("_guess/"));
    let inst = std::fs::read_dir(tfs.root().join("instances"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with("_guess"))
        })
        .unwrap_or(false);
    let v6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    let ula = v6
        .lines()
        .filter(|l| l.starts_with("fd") && l.trim_end().ends_with(" lo"))
        .count();
    (probes, inst, ula)
}

/// Capability number of CAP_NET_RAW.
const CAP_NET_RAW: u32 = 13;
/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// Clears CAP_NET_RAW from this thread's effective set.
fn drop_net_raw() -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: header and two data structs laid out as the kernel's
    // __user_cap_header_struct / __user_cap_data_struct, valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    d[0].effective &= !(1 << CAP_NET_RAW);
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) };
    rc == 0
}

fn main() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("@@KERNEL {}", release.trim());

    let t = Instant::now();
    let btf = probe::setup(&cfg(OffsetsMode::Auto)).expect("setup with BTF");
    let btf_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(matches!(btf.offsets.provenance, Provenance::Btf(_)));
    println!("@@TIME btf_setup_ms={btf_ms:.1}");

    let t = Instant::now();
    let guessed = probe::setup(&cfg(OffsetsMode::Guess));
    let guess_ms = t.elapsed().as_secs_f64() * 1e3;
    println!("@@TIME guess_setup_ms={guess_ms:.1}");
    let guessed = match guessed {
        Ok(s) => s,
        Err(e) => {
            println!("@@GUESS_FAILED {e}");
            let _ = probe::check(&cfg(OffsetsMode::Guess))
                .iter()
                .map(|i| println!("{i}"))
                .count();
            return;
        }
    };
    for g in &guessed.guesses {
        println!(
            "@@REPORT {} reps={} ms={:.1} {}",
            g.name,
            g.repetitions,
            g.duration.as_secs_f64() * 1e3,
            g
        );
    }
    println!("{}", guessed.offsets);
    diff(&btf.offsets, &guessed.offsets, "forced");
    let (p, i, u) = leftovers(&guessed.tracefs);
    println!("@@LEFTOVERS probes={p} instance={i} ula_on_lo={u}");

    // The probe set built from guessed offsets must be accepted.
    let guard = probe::ProbeGuard::install(&guessed.tracefs, &guessed.probes);
    println!(
        "@@INSTALL_GUESSED {}",
        match &guard {
            Ok(g) => format!("ok {} events", g.events().len()),
            Err(e) => format!("FAILED {e}"),
        }
    );
    drop(guard);
    drop(guessed);

    // Hide BTF: auto must fall back to guessing and say why.
    let vmlinux = Path::new(probe::btf::VMLINUX_BTF);
    nix::mount::mount(
        Some(Path::new("/dev/null")),
        vmlinux,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind mount over vmlinux BTF");
    let t = Instant::now();
    let auto = probe::setup(&cfg(OffsetsMode::Auto));
    let auto_ms = t.elapsed().as_secs_f64() * 1e3;
    println!("@@TIME auto_hidden_setup_ms={auto_ms:.1}");
    match auto {
        Ok(s) => {
            match &s.offsets.provenance {
                Provenance::Guess { why } => println!("@@AUTO guess why={why}"),
                Provenance::Btf(p) => println!("@@AUTO btf {}", p.display()),
            }
            diff(&btf.offsets, &s.offsets, "auto");
        }
        Err(e) => println!("@@AUTO FAILED {e}"),
    }
    let btf_only = probe::setup(&cfg(OffsetsMode::Btf));
    println!(
        "@@BTF_MODE_HIDDEN {}",
        match btf_only {
            Ok(_) => "unexpectedly ok".to_string(),
            Err(e) => format!("error exit={} {e}", e.exit_code()),
        }
    );
    println!("@@CHECK_BEGIN");
    for item in probe::check(&cfg(OffsetsMode::Auto)) {
        if !item.name.starts_with("probe ") {
            println!("{item}");
        }
    }
    println!("@@CHECK_END");
    let _ = nix::mount::umount(vmlinux);

    // IPv6 off on lo: the IPv6 guesses use IPv4-mapped addresses instead.
    let lo6 = "/proc/sys/net/ipv6/conf/lo/disable_ipv6";
    std::fs::write(lo6, "1").expect("disable IPv6 on lo");
    match probe::setup(&cfg(OffsetsMode::Guess)) {
        Ok(s) => {
            println!("@@MAPPED ipv6_monitored={}", s.ipv6);
            diff(&btf.offsets, &s.offsets, "mapped");
        }
        Err(e) => println!("@@MAPPED FAILED {e}"),
    }
    std::fs::write(lo6, "0").expect("enable IPv6 on lo");

    // Without CAP_NET_RAW the raw-socket sample of sock_type is skipped.
    if drop_net_raw() {
        match probe::setup(&cfg(OffsetsMode::Guess)) {
            Ok(s) => {
                for g in s.guesses.iter().filter(|g| g.name == "sock_type") {
                    println!("@@NORAW_REPORT {g}");
                }
                diff(&btf.offsets, &s.offsets, "noraw");
            }
            Err(e) => println!("@@NORAW FAILED {e}"),
        }
    } else {
        println!("@@NORAW could not drop CAP_NET_RAW");
    }
    println!("@@DONE");
}
