//! Tests of the process table.

use super::*;

#[test]
fn busybox_applets_are_named_by_argv0() {
    assert_eq!(
        person_name("exe".into(), "/bin/busybox", &["httpd".into(), "-f".into()]),
        "httpd"
    );
    assert_eq!(
        person_name("exe".into(), "/bin/busybox", &["/bin/wget".into()]),
        "wget"
    );
    // A program that is really called exe, or has no argv, keeps it.
    assert_eq!(
        person_name("exe".into(), "/opt/x/exe", &["a".into()]),
        "exe"
    );
    assert_eq!(person_name("exe".into(), "/bin/busybox", &[]), "exe");
    assert_eq!(
        person_name("curl".into(), "/usr/bin/curl", &["c".into()]),
        "curl"
    );
    assert!(is_proc_exe("/proc/self/exe"));
    assert!(is_proc_exe("/proc/1234/exe"));
    assert!(!is_proc_exe("/proc/exe"));
    assert!(!is_proc_exe("/usr/bin/exe"));
}

#[test]
fn an_applet_gone_before_its_exec_is_read_keeps_the_executable() {
    let src = FakeProcSource::default();
    let mut t = ProcessTable::new(
        Box::new(src.clone()),
        UserDb::empty(),
        ProcessTableConfig {
            max_processes: 16,
            exit_grace: Duration::from_secs(5),
        },
    );
    src.set(ProcSnapshot {
        pid: 30,
        ppid: 1,
        name: "sh".into(),
        args: vec!["sh".into()],
        exe: "/bin/busybox".into(),
        start: None,
        creds: None,
        cgroup: None,
    });
    t.scan().unwrap();
    // The applet execs and exits before /proc is read.
    src.remove(30);
    t.on_exec(30, "/proc/self/exe");
    let p = t.lookup(30);
    assert_eq!(p.executable, "/bin/busybox");
    assert_eq!(p.name, "busybox");
}

#[test]
fn an_applet_gone_before_its_exec_is_read_is_named_by_the_events_argv0() {
    let src = FakeProcSource::default();
    let mut t = table(&src, 16);
    let mut sh = snap(30, "sh", 100, 1000);
    sh.exe = "/bin/busybox".into();
    src.set(sh);
    t.scan().unwrap();
    src.remove(30);
    t.on_exec_args(30, vec!["wget".into(), "-q".into()]);
    t.on_exec(30, "/proc/self/exe");
    let p = t.lookup(30);
    assert_eq!(
        (p.name.as_str(), p.executable.as_str(), p.args.clone()),
        (
            "wget",
            "/bin/busybox",
            vec!["wget".to_string(), "-q".to_string()]
        )
    );
    // A plain exec of a vanished process: the kernel's name (the
    // file's base name) and the event's arguments.
    t.on_fork(10, 31, UNIX_EPOCH);
    t.on_exec_args(31, vec!["tool".into(), "--once".into()]);
    t.on_exec(31, "/opt/bin/tool-1.2");
    let p = t.lookup(31);
    assert_eq!(
        (p.name.as_str(), p.executable.as_str(), p.args.len()),
        ("tool-1.2", "/opt/bin/tool-1.2", 2)
    );
}

#[test]
fn proc_adds_the_arguments_past_the_fetched_ones_and_nothing_else() {
    let src = FakeProcSource::default();
    let mut t = table(&src, 16);
    let mut s = snap(40, "cc", 100, 1000);
    s.args = ["cc", "-O2", "-c", "a.c", "-o", "a.o"]
        .map(String::from)
        .to_vec();
    src.set(s.clone());
    t.on_exec_args(40, ["cc", "-O2", "-c", "a.c"].map(String::from).to_vec());
    t.on_exec(40, "/usr/bin/cc");
    assert_eq!(
        t.lookup(40).args,
        s.args,
        "/proc continues the event's arguments"
    );
    // /proc already shows a later image: the event's arguments stand.
    t.on_exec_args(40, vec!["cc".into(), "-E".into()]);
    t.on_exec(40, "/usr/bin/cc");
    assert_eq!(t.lookup(40).args, vec!["cc".to_string(), "-E".to_string()]);
}

#[test]
fn exec_arguments_wait_for_their_exec_only_as_long_as_the_process_lives() {
    let src = FakeProcSource::default();
    let mut t = table(&src, 16);
    t.on_exec_args(50, vec!["lost".into()]);
    t.on_exit(50, 50, 1);
    t.on_exec(50, "/bin/true");
    assert!(
        t.lookup(50).args.is_empty(),
        "arguments of an earlier image"
    );
    for pid in 0..=MAX_PENDING_EXEC_ARGS as u32 {
        t.on_exec_args(1000 + pid, vec!["x".into()]);
    }
    assert!(t.pending_args.len() <= MAX_PENDING_EXEC_ARGS);
}

fn snap(pid: u32, name: &str, start_s: u64, uid: u32) -> ProcSnapshot {
    ProcSnapshot {
        pid,
        ppid: 1,
        name: name.to_string(),
        args: vec![name.to_string(), "--flag".to_string()],
        exe: format!("/usr/bin/{name}"),
        start: Some(UNIX_EPOCH + Duration::from_secs(start_s)),
        creds: Some(Creds {
            uid,
            gid: uid,
            euid: uid,
            egid: uid,
        }),
        cgroup: Some(format!(
            "0::/system.slice/docker-{}.scope\n",
            "ab".repeat(32)
        )),
    }
}

fn users() -> UserDb {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    std::fs::write(
        dir.path().join("etc/passwd"),
        "root:x:0:0::/:/bin/sh\nalice:x:1000:1000::/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:1000:\n").unwrap();
    UserDb::load(dir.path()).unwrap()
}

fn table(src: &FakeProcSource, max: usize) -> ProcessTable {
    ProcessTable::new(
        Box::new(src.clone()),
        users(),
        ProcessTableConfig {
            max_processes: max,
            exit_grace: Duration::from_secs(5),
        },
    )
}

const S: u64 = 1_000_000_000;

#[test]
fn scan_reads_everything_and_names_creds() {
    let src = FakeProcSource::default();
    src.set(snap(10, "curl", 100, 1000));
    src.set(snap(11, "sshd", 50, 0));
    let mut t = table(&src, 16);
    assert_eq!(t.scan().unwrap(), 2);
    let p = t.get(10).unwrap();
    assert_eq!(p.name, "curl");
    assert_eq!(p.args, vec!["curl", "--flag"]);
    assert_eq!(p.executable, "/usr/bin/curl");
    assert_eq!(p.user_name.as_deref(), Some("alice"));
    assert_eq!(p.group_name.as_deref(), Some("staff"));
    assert_eq!(p.container_id.as_deref(), Some("ab".repeat(32).as_str()));
    assert_eq!(t.get(11).unwrap().user_name.as_deref(), Some("root"));
}

#[test]
fn fork_inherits_then_exec_rereads() {
    let src = FakeProcSource::default();
    src.set(snap(10, "bash", 100, 1000));
    let mut t = table(&src, 16);
    t.scan().unwrap();
    let created = UNIX_EPOCH + Duration::from_secs(200);
    t.on_fork(10, 20, created);
    let child = t.get(20).unwrap();
    assert_eq!(
        (child.pid, child.ppid, child.name.as_str()),
        (20, 10, "bash")
    );
    assert_eq!(child.created, Some(created));
    assert_eq!(child.creds, t.get(10).unwrap().creds);
    // exec: /proc has the new image.
    let mut s = snap(20, "curl", 999, 1000);
    s.start = None;
    src.set(s);
    t.on_exec(20, "/usr/bin/curl");
    let c = t.get(20).unwrap();
    assert_eq!(c.name, "curl");
    assert_eq!(c.created, Some(created), "exec keeps the start time");
    // exec of a vanished process falls back to the file name.
    t.on_fork(10, 21, created);
    t.on_exec(21, "/opt/tool/bin/thing");
    let c = t.get(21).unwrap();
    assert_eq!(
        (c.name.as_str(), c.executable.as_str()),
        ("thing", "/opt/tool/bin/thing")
    );
    assert!(c.args.is_empty());
}

#[test]
fn creds_update_names() {
    let src = FakeProcSource::default();
    src.set(snap(10, "sudo", 100, 1000));
    let mut t = table(&src, 16);
    t.scan().unwrap();
    let before = t.get(10).unwrap();
    t.on_creds(10, Creds::default());
    let after = t.get(10).unwrap();
    assert_eq!(after.user_name.as_deref(), Some("root"));
    assert_eq!(
        before.user_name.as_deref(),
        Some("alice"),
        "old snapshots are unchanged"
    );
}

#[test]
fn exit_grace_then_removal_and_pid_reuse() {
    let src = FakeProcSource::default();
    src.set(snap(10, "old", 100, 1000));
    let mut t = table(&src, 16);
    t.scan().unwrap();
    let old = t.lookup(10);
    t.on_exit(10, 10, S);
    t.expire(5 * S);
    assert_eq!(t.get(10).unwrap().name, "old", "resolvable during grace");
    t.expire(6 * S);
    assert!(t.get(10).is_none());
    // The pid comes back as a different process.
    src.set(snap(10, "new", 300, 0));
    let new = t.lookup(10);
    assert_eq!(new.name, "new");
    assert_eq!(old.name, "old");
    assert_ne!(ProcKey::of(&old), ProcKey::of(&new));
}

#[test]
fn fork_during_grace_replaces_pid_and_old_removal_keeps_new() {
    let src = FakeProcSource::default();
    src.set(snap(10, "old", 100, 1000));
    src.set(snap(1, "init", 1, 0));
    let mut t = table(&src, 16);
    t.scan().unwrap();
    t.on_exit(10, 10, S);
    t.on_fork(1, 10, UNIX_EPOCH + Duration::from_secs(400));
    assert_eq!(t.get(10).unwrap().name, "init");
    t.expire(100 * S);
    assert_eq!(
        t.get(10).unwrap().name,
        "init",
        "removing the old entry leaves the new one"
    );
}

#[test]
fn thread_exit_removes_thread_entry_only() {
    let src = FakeProcSource::default();
    src.set(snap(10, "app", 100, 1000));
    let mut t = table(&src, 16);
    t.scan().unwrap();
    t.on_fork(10, 11, UNIX_EPOCH + Duration::from_secs(101));
    assert_eq!(t.len(), 2);
    t.on_exit(10, 11, S);
    assert_eq!(t.len(), 1);
    assert!(t.get(10).is_some());
}

#[test]
fn unknown_pid_gets_a_minimal_entry_once() {
    let src = FakeProcSource::default();
    let mut t = table(&src, 16);
    let p = t.lookup(77);
    assert_eq!(p.pid, 77);
    assert!(p.name.is_empty());
    assert_eq!(t.stats().read_failures, 1);
    t.lookup(77);
    assert_eq!(t.stats().read_failures, 1, "not read again");
}

#[test]
fn bound_evicts_exited_first_then_oldest() {
    let src = FakeProcSource::default();
    for pid in 1..=3 {
        src.set(snap(pid, "p", u64::from(pid), 0));
    }
    let mut t = table(&src, 3);
    t.scan().unwrap();
    t.on_exit(2, 2, S);
    src.set(snap(4, "p", 4, 0));
    t.lookup(4);
    assert_eq!(t.len(), 3);
    assert!(t.get(2).is_none(), "exited entry evicted first");
    src.set(snap(5, "p", 5, 0));
    t.lookup(5);
    assert!(t.get(1).is_none(), "then the oldest");
    assert_eq!(t.take_evictions(), 2);
    assert_eq!(t.take_evictions(), 0);
    assert_eq!(t.stats().evictions, 2);
}

#[test]
fn procfs_reads_this_process() {
    let fs = ProcFs::new("/proc").expect("/proc must be mounted");
    let me = fs.read(std::process::id()).unwrap();
    assert_eq!(me.pid, std::process::id());
    assert!(!me.name.is_empty());
    assert!(me.start.unwrap() <= SystemTime::now());
    assert!(fs.pids().unwrap().contains(&std::process::id()));
}

#[test]
fn an_exec_file_name_that_is_a_link_is_resolved_in_the_parents_root_once_the_process_is_gone() {
    let src = FakeProcSource::default();
    let mut t = ProcessTable::new(
        Box::new(src.clone()),
        UserDb::empty(),
        ProcessTableConfig {
            max_processes: 16,
            exit_grace: Duration::from_secs(5),
        },
    );
    src.set(ProcSnapshot {
        pid: 40,
        ppid: 1,
        name: "agent".into(),
        args: vec!["agent".into()],
        exe: "/bin/busybox".into(),
        start: None,
        creds: None,
        cgroup: None,
    });
    src.set_resolved(40, "/bin/sh", "/bin/busybox");
    t.scan().unwrap();
    t.on_fork(40, 41, SystemTime::UNIX_EPOCH);
    // The child runs `sh` as /bin/sh and is gone before anything reads it.
    t.on_exec(41, "/bin/sh");
    let p = t.lookup(41);
    assert_eq!((p.executable.as_str(), p.ppid), ("/bin/busybox", 40));
    // Nothing left to resolve it in: the name as given stands.
    src.remove(40);
    t.on_fork(40, 42, SystemTime::UNIX_EPOCH);
    t.on_exec(42, "/bin/sh");
    assert_eq!(t.lookup(42).executable, "/bin/sh");
}
