//! Decoding of the sched tracepoints on the host kernel: records are taken
//! from a private ftrace instance (same layout as perf raw samples) while a
//! child process is spawned. Needs root and tracefs; fails loudly otherwise.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sockscope::decode::{ftrace::page_records, Decoder, DecoderKind, EventDesc};
use sockscope::model::{EventKind, RawSample};

mod common;

/// ftrace ring-buffer page size on x86_64.
const PAGE: usize = 4096;

struct Instance(PathBuf);

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("events/sched/enable"), "0");
        let _ = fs::remove_dir(&self.0);
    }
}

fn read_cpu_records(dir: &Path) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    let per_cpu = dir.join("per_cpu");
    for entry in fs::read_dir(&per_cpu).expect("per_cpu directory") {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(cpu) = name.strip_prefix("cpu").and_then(|c| c.parse::<u32>().ok()) else {
            continue;
        };
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(entry.path().join("trace_pipe_raw"))
            .expect("trace_pipe_raw");
        let mut page = vec![0u8; PAGE];
        while let Ok(n) = f.read(&mut page) {
            if n == 0 {
                break;
            }
            for r in page_records(&page[..n]) {
                out.push((cpu, r.to_vec()));
            }
        }
    }
    out
}

#[test]
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
fn sched_tracepoints_decode_exec_fork_exit_of_a_child() {
    common::require_privileges(false);
    let dir = common::tracefs()
        .join("instances")
        .join(format!("sockscope_test_{}", std::process::id()));
    fs::create_dir(&dir).expect("create ftrace instance");
    let inst = Instance(dir.clone());
    let events = [
        ("sched_process_exec", DecoderKind::Exec),
        ("sched_process_fork", DecoderKind::Fork),
        ("sched_process_exit", DecoderKind::Exit),
    ];
    let formats: Vec<String> = events
        .iter()
        .map(|(n, _)| fs::read_to_string(dir.join("events/sched").join(n).join("format")).unwrap())
        .collect();
    let descs: Vec<EventDesc> = events
        .iter()
        .zip(&formats)
        .map(|((_, kind), f)| EventDesc {
            kind: *kind,
            task_context: true,
            format: f,
        })
        .collect();
    let dec = Decoder::new(&descs).expect("decoder for host formats");
    let ids: HashMap<u16, u32> = formats
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let id = sockscope::decode::Format::parse(f).unwrap().id as u16;
            (id, i as u32)
        })
        .collect();
    for (n, _) in &events {
        fs::write(dir.join("events/sched").join(n).join("enable"), "1").unwrap();
    }
    let child = std::process::Command::new("/bin/true").spawn().unwrap();
    let child_pid = child.id();
    let status = child.wait_with_output().unwrap().status;
    assert!(status.success());
    fs::write(dir.join("events/sched/enable"), "0").unwrap();
    let recs = read_cpu_records(&dir);
    drop(inst);

    let mut exec = None;
    let mut fork = None;
    let mut exit = None;
    for (cpu, r) in &recs {
        let ty = u16::from_le_bytes([r[0], r[1]]);
        let Some(&idx) = ids.get(&ty) else { continue };
        let pid = i32::from_le_bytes([r[4], r[5], r[6], r[7]]) as u32;
        let s = RawSample {
            event: idx,
            time: 0,
            cpu: *cpu,
            pid,
            tid: pid,
            data: r,
        };
        let ev = dec
            .decode(&s)
            .expect("host record decodes")
            .expect("not ignored");
        match ev.kind {
            EventKind::Exec { pid, ref filename } if pid == child_pid => {
                exec = Some(filename.clone())
            }
            EventKind::Fork { child, parent } if child == child_pid => fork = Some(parent),
            EventKind::Exit { tid, .. } if tid == child_pid => exit = Some(ev.task),
            _ => {}
        }
    }
    assert_eq!(exec.as_deref(), Some("/bin/true"));
    // The forking thread is one of ours: its tgid is this process.
    let parent = fork.expect("fork of the child seen");
    let status = fs::read_to_string(format!("/proc/{parent}/status")).unwrap_or_default();
    assert!(
        status.contains(&format!("Tgid:\t{}", std::process::id())),
        "fork parent {parent} is not a thread of this process"
    );
    let task = exit
        .expect("exit of the child seen")
        .expect("exit has a task");
    assert_eq!(task.tid, child_pid);
}
