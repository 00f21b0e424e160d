#!/usr/bin/env python3
"""Real-kernel VM test bed: initramfs builder, qemu boot, guest control.

One :class:`VM` boots one Debian cloud kernel (see :mod:`kernels`) under
``qemu-system-x86_64 -accel tcg`` with a busybox initramfs that carries the
freshly built ``sockscope`` binary, tcpdump and the control agent
(``agent.sh``).  The host drives the guest over a forwarded TCP port: run a
command, spawn a background command, fetch or put a file.

Command line: ``bed.py try SUITE`` boots a kernel with the daemon and a
small workload running and forwards the gRPC port to 127.0.0.1:50051;
``bed.py boot SUITE`` boots and runs a shell on the console.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernels  # noqa: E402
import oracle  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
#: Guest port of the daemon's gRPC server.
GUEST_GRPC_PORT = 50051
#: Guest port of the control agent.
GUEST_CONTROL_PORT = 7070
#: Guest path of the daemon binary.
GUEST_DAEMON = "/usr/bin/sockscope"
#: Guest path of the daemon log.
GUEST_DAEMON_LOG = "/var/log/sockscope.log"
#: The accelerator: TCG with both vCPUs on one host thread. Multi-threaded
#: TCG occasionally leaves both vCPUs looping on a jump-label site the
#: kernel is live-patching (the daemon enabling or disabling tracepoints),
#: a soft lockup of the whole guest; one TCG thread keeps code patching
#: and execution ordered. SOCKSCOPE_TCG overrides it.
TCG_ACCEL = os.environ.get("SOCKSCOPE_TCG", "tcg,thread=single")
#: Guest memory (MiB) and CPUs.
VM_MEMORY_MB = 1024
VM_CPUS = 2
#: Boot timeout: about 9x a normal boot (19 s), for heavily loaded hosts.
BOOT_TIMEOUT_S = float(os.environ.get("SOCKSCOPE_BOOT_TIMEOUT", "180"))
#: Kernel console log level: 6 shows the boot progress in console.log (for
#: diagnosing a stalled boot) at a cost of about a second under TCG.
CONSOLE_LOGLEVEL = int(os.environ.get("SOCKSCOPE_CONSOLE_LOGLEVEL", "6"))
#: Boots tried before giving up (a TCG boot on an overloaded host can stall).
BOOT_ATTEMPTS = 2
#: Line /init prints on the console once the control agent listens.
READY_MARKER = "SOCKSCOPE-BED-READY"
#: Reply timeout of one readiness probe during boot.
BOOT_PROBE_TIMEOUT_S = 5
#: Default timeout of one guest command.
RUN_TIMEOUT_S = 60
#: Extra host-side slack on top of the guest-side timeout.
SOCKET_SLACK_S = 30
#: How long start_daemon waits for the gRPC health check to answer SERVING.
DAEMON_READY_TIMEOUT_S = 90
#: Bytes captured per packet by the oracle (headers only).
CAPTURE_SNAPLEN = 256
#: Modules loaded in the guest for networking (those built in are skipped).
NET_MODULES = ("virtio", "virtio_ring", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
               "virtio_pci", "failover", "net_failover", "virtio_net")
#: Extra guest ports forwarded from a free host port on 127.0.0.1, for
#: scenarios whose traffic must cross eth0 (virtio); ``VM.forwards`` maps
#: ``(proto, guest_port)`` to the host port.
EXTRA_FORWARDS = (("tcp", 9180), ("udp", 9181))
#: Where the guest reaches a host service (qemu's guestfwd): a connection
#: to this address runs ``socat`` on the host, joined to 127.0.0.1 at
#: ``VM.host_service_port``, where a test serves what the guest needs (the
#: recorded container runtime of the pod scenarios). Nothing listens there
#: unless a test does: the connection is then closed at once.
HOST_SERVICE_ADDR = ("10.0.2.100", 10010)
#: Host binaries copied into the guest with their shared libraries.
HOST_TOOLS = ("/usr/bin/tcpdump", "/usr/bin/socat")


class BedError(RuntimeError):
    """The VM could not be built, booted or driven."""


class BedTimeout(BedError):
    """The guest did not come up in time."""


def build_static(src: Path) -> Path:
    """Compile the C tool ``src`` statically for the guest, into the logs directory (cached by
    source mtime); raises :class:`BedError` with the compiler's output when it fails."""
    out = logs_root() / src.stem
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(src)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BedError(f"building {src.name} failed:\n{r.stderr}")
    return out


def logs_root() -> Path:
    """Where consoles, pcaps and daemon logs go (``SOCKSCOPE_VM_LOGS``)."""
    return Path(os.environ.get("SOCKSCOPE_VM_LOGS", REPO / "target" / "vm-bed"))


def daemon_binary() -> Path | None:
    """The release daemon binary (``SOCKSCOPE_BIN`` overrides), if built."""
    p = Path(os.environ.get("SOCKSCOPE_BIN", REPO / "target" / "release" / "sockscope"))
    return p if p.exists() else None


def capture_stats(log: str) -> dict[str, int] | None:
    """tcpdump's exit statistics ("N packets captured", "... dropped by kernel"), or None."""
    stats = {}
    for key in ("captured", "received by filter", "dropped by kernel"):
        m = re.search(rf"^(\d+) packets? {key}$", log, re.M)
        if m is None:
            return None
        stats[key] = int(m.group(1))
    return stats


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- initramfs

def _ldd(binary: Path) -> list[Path]:
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if r.returncode != 0:
        if "not a dynamic executable" in (r.stdout + r.stderr):
            return []
        raise BedError(f"ldd {binary} failed: {r.stderr.strip()}")
    libs = []
    for line in r.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            i = parts.index("=>")
            if i + 1 < len(parts) and parts[i + 1].startswith("/"):
                libs.append(Path(parts[i + 1]))
        elif parts and parts[0].startswith("/"):
            libs.append(Path(parts[0]))
    return libs


def _decompress_module(src: Path, dst: Path) -> None:
    name = src.name
    if name.endswith(".ko"):
        shutil.copyfile(src, dst)
        return
    tool = {".xz": ["xz", "-dc"], ".zst": ["zstd", "-dcq"], ".gz": ["gzip", "-dc"]}[src.suffix]
    with open(dst, "wb") as out:
        subprocess.run(tool + [str(src)], stdout=out, check=True)


def build_initramfs(kernel: kernels.Kernel, out: Path, extra_files: dict[str, Path | bytes] | None = None,
                    with_daemon: bool = True) -> Path:
    """Build an uncompressed newc cpio initramfs at ``out`` and return it.

    ``extra_files`` maps guest paths to host paths or contents.  Uncompressed
    because decompression under TCG costs more than loading the bytes.
    """
    with tempfile.TemporaryDirectory(prefix="bed-initramfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run",
                  "root", "var/log", "lib/modules/bed", "bed", "www"):
            (root / d).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mknod", "-m", "600", str(root / "dev/console"), "c", "5", "1"], check=True)
        subprocess.run(["mknod", "-m", "666", str(root / "dev/null"), "c", "1", "3"], check=True)
        shutil.copy2("/usr/bin/busybox" if Path("/usr/bin/busybox").exists() else "/bin/busybox",
                     root / "bin/busybox")
        shutil.copy2(HERE / "init.sh", root / "init")
        shutil.copy2(HERE / "agent.sh", root / "bed/agent.sh")
        os.chmod(root / "init", 0o755)
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (root / "etc/nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
        (root / "www/index.html").write_text("sockscope test bed\n" * 64)
        # Network modules, decompressed on the host.
        for name in NET_MODULES:
            found = [p for p in kernel.modules.rglob(f"{name}.ko*") if p.name.split(".ko")[0] == name]
            if found:
                _decompress_module(found[0], root / "lib/modules/bed" / f"{name}.ko")
        # Dynamic binaries with their libraries and loader.
        binaries: list[tuple[Path, str]] = [(Path(t), t) for t in HOST_TOOLS]
        if with_daemon:
            daemon = daemon_binary()
            if daemon is None:
                raise BedError("target/release/sockscope is missing: run `cargo build --release` first "
                               "(or set SOCKSCOPE_BIN)")
            binaries.append((daemon, GUEST_DAEMON))
        for host, guest in binaries:
            if not host.exists():
                raise BedError(f"{host} is missing on the host (apt-get install tcpdump socat)")
            dst = root / guest.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(host, dst)
            for lib in _ldd(host):
                ldst = root / str(lib).lstrip("/")
                if not ldst.exists():
                    ldst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(lib.resolve(), ldst)
        for guest, src in (extra_files or {}).items():
            dst = root / guest.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                dst.write_bytes(src)
            else:
                shutil.copy2(src, dst)
        out.parent.mkdir(parents=True, exist_ok=True)
        names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        with open(out, "wb") as f:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=root, input=names, stdout=f, check=True)
    return out


# --------------------------------------------------------------------------- guest control

@dataclasses.dataclass
class Result:
    """Outcome of :meth:`VM.run`."""

    cmd: str
    rc: int
    out: str
    err: str

    def check(self) -> "Result":
        if self.rc != 0:
            raise BedError(f"guest command failed (rc={self.rc}): {self.cmd}\nstdout:\n{self.out}\nstderr:\n{self.err}")
        return self


@dataclasses.dataclass
class Spawned:
    """A background guest process started by :meth:`VM.spawn`."""

    vm: "VM"
    cmd: str
    pid: int
    id: int

    @property
    def log_path(self) -> str:
        return f"/tmp/bed/spawn.{self.id}.log"

    def log(self) -> str:
        return self.vm.fetch(self.log_path).decode(errors="replace")

    def returncode(self) -> int | None:
        r = self.vm.run(f"cat /tmp/bed/spawn.{self.id}.rc 2>/dev/null")
        return int(r.out) if r.out.strip() else None

    def alive(self) -> bool:
        return self.returncode() is None

    def signal(self, sig: str = "TERM") -> None:
        self.vm.run(f"kill -{sig} {self.pid} 2>/dev/null; true")

    def wait(self, timeout: float = 30) -> int:
        """Wait for exit and return the exit status (128+N when killed by signal N)."""
        r = self.vm.run(f"n=0; while [ ! -s /tmp/bed/spawn.{self.id}.rc ] && [ $n -lt {int(timeout * 10)} ]; "
                        f"do usleep 100000; n=$((n+1)); done; cat /tmp/bed/spawn.{self.id}.rc",
                        timeout=timeout + 10)
        if not r.out.strip():
            raise BedError(f"guest process {self.pid} ({self.cmd}) did not exit within {timeout}s")
        return int(r.out)

    def stop(self, sig: str = "TERM", timeout: float = 30) -> int:
        self.signal(sig)
        return self.wait(timeout)


class Capture:
    """Ground-truth capture, filled in when the ``with`` block of :meth:`VM.capture` ends."""

    def __init__(self, pcap_guest: str):
        self.pcap_guest = pcap_guest
        self.pcap: bytes = b""
        self.packets: list[oracle.PacketRecord] = []
        self.totals: oracle.Totals = oracle.Totals([])


class VM:
    """A booted guest.  Use as a context manager or call :meth:`close`."""

    def __init__(self, suite: str, *, extra_files: dict[str, Path | bytes] | None = None,
                 with_daemon: bool | None = None, shell: bool = False, grpc_host_port: int | None = None,
                 logdir: Path | None = None, extra_forwards: "list[int] | tuple[int, ...]" = (),
                 host_service_port: int | None = None):
        self.suite = suite
        self.kernel = kernels.fetch(suite)
        self.logdir = logdir or logs_root() / suite
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.logdir / "console.log"
        self.with_daemon = daemon_binary() is not None if with_daemon is None else with_daemon
        self.grpc_port = grpc_host_port or free_port()
        self.control_port = free_port()
        # free_port() releases the port it found, so two calls can return
        # the same one: every forward needs its own.
        while self.control_port == self.grpc_port:
            self.control_port = free_port()
        #: guest TCP port -> host port on 127.0.0.1, beyond gRPC and control.
        self.forwards: dict[int | tuple[str, int], int] = {}
        for guest_port in sorted(set(extra_forwards) - {GUEST_GRPC_PORT, GUEST_CONTROL_PORT}):
            host = free_port()
            while host in (self.grpc_port, self.control_port, *self.forwards.values()):
                host = free_port()
            self.forwards[guest_port] = host
        # Fixed (protocol, guest port) forwards of the virtio scenarios.
        for fw in EXTRA_FORWARDS:
            host = free_port()
            while host in (self.grpc_port, self.control_port, *self.forwards.values()):
                host = free_port()
            self.forwards[fw] = host
        # A second guest may share the first one's host service.
        self.host_service_port = host_service_port or free_port()
        while host_service_port is None and self.host_service_port in (self.grpc_port, self.control_port, *self.forwards.values()):
            self.host_service_port = free_port()
        self.shell = shell
        self.extra_files = extra_files
        self.proc: subprocess.Popen | None = None
        self.boot_seconds: float | None = None  # qemu start until the agent answers
        self.guest_uptime_at_ready: float | None = None  # guest's own clock when /init was ready
        self.daemon: Spawned | None = None
        self._captures = 0
        #: One entry per judged flow scenario (flowlib.Scenario.verdict):
        #: flows judged, packet-probe misses measured, allowance used.
        self.accounting: list[dict] = []

    # ---- lifecycle
    def start(self) -> "VM":
        """Build the initramfs and boot; a boot that times out is retried once, loudly."""
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                return self._start()
            except BedTimeout as e:
                if attempt == BOOT_ATTEMPTS:
                    raise
                keep = self.logdir / f"console.attempt{attempt}.log"
                shutil.copyfile(self.console_log, keep)
                print(f"[bed] WARNING: {self.suite} boot attempt {attempt} timed out; console kept in {keep}; "
                      f"retrying\n{str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        raise AssertionError("unreachable")

    def _start(self) -> "VM":
        t0 = time.monotonic()
        initrd = build_initramfs(self.kernel, self.logdir / "initramfs.cpio", self.extra_files,
                                 with_daemon=self.with_daemon)
        self.initramfs_seconds = time.monotonic() - t0
        cmdline = (f"console=ttyS0 panic=-1 loglevel={CONSOLE_LOGLEVEL} bed.port={GUEST_CONTROL_PORT} "
                   f"bed.shell={1 if self.shell else 0} net.ifnames=0 tsc=reliable no_timer_check")
        netdev = (f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.grpc_port}-:{GUEST_GRPC_PORT},"
                  f"hostfwd=tcp:127.0.0.1:{self.control_port}-:{GUEST_CONTROL_PORT}"
                  + "".join(f",hostfwd={k[0] if isinstance(k, tuple) else 'tcp'}:127.0.0.1:{h}-"
                            f":{k[1] if isinstance(k, tuple) else k}" for k, h in self.forwards.items())
                  + f",guestfwd=tcp:{HOST_SERVICE_ADDR[0]}:{HOST_SERVICE_ADDR[1]}-"
                  f"cmd:socat - TCP:127.0.0.1:{self.host_service_port}")
        argv = ["qemu-system-x86_64", "-accel", TCG_ACCEL, "-cpu", "max", "-smp", str(VM_CPUS),
                "-m", str(VM_MEMORY_MB), "-nographic", "-no-reboot", "-nodefaults",
                "-kernel", str(self.kernel.vmlinuz), "-initrd", str(initrd), "-append", cmdline,
                "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,romfile="]
        if self.shell:
            argv += ["-serial", "mon:stdio"]
            self.proc = subprocess.Popen(argv)
        else:
            argv += ["-serial", f"file:{self.console_log}", "-monitor", "none"]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=open(self.logdir / "qemu.stderr", "wb"))
        (self.logdir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
        t1 = time.monotonic()
        deadline = t1 + BOOT_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise BedError(f"qemu exited with {self.proc.returncode} while booting {self.suite}\n"
                               + self.diagnostics())
            # Connecting before the guest listens makes slirp retransmit the SYN
            # with backoff, which would add seconds: wait for /init's marker
            # first (the console is a file unless in shell mode).
            ready = self.shell or READY_MARKER in self._console_text()
            try:
                if ready and self.run("echo bed-ok", timeout=BOOT_PROBE_TIMEOUT_S, connect_timeout=2,
                                      reply_timeout=BOOT_PROBE_TIMEOUT_S).out.strip() == "bed-ok":
                    break
            except (OSError, BedError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise BedTimeout(f"{self.suite}: guest agent did not answer within {BOOT_TIMEOUT_S:.0f}s\n"
                               + self.diagnostics())
            time.sleep(0.1 if not ready else 0.5)
        self.boot_seconds = time.monotonic() - t1
        m = re.search(READY_MARKER + r" port=\d+ uptime=([0-9.]+)", self._console_text())
        self.guest_uptime_at_ready = float(m.group(1)) if m else None
        return self

    def host_port(self, guest_port: int) -> int:
        """Host port (on 127.0.0.1) forwarded to a guest TCP port."""
        if guest_port == GUEST_GRPC_PORT:
            return self.grpc_port
        if guest_port not in self.forwards:
            raise BedError(f"guest port {guest_port} is not forwarded; declare it in the test module's "
                           f"GUEST_FORWARDS (forwarded: {sorted(map(str, self.forwards))})")
        return self.forwards[guest_port]

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "VM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    # ---- control channel
    def _request(self, line: str, payload: bytes = b"", timeout: float = RUN_TIMEOUT_S,
                 connect_timeout: float = 10) -> bytes:
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=connect_timeout) as s:
            s.settimeout(timeout)
            s.sendall(line.encode() + b"\n" + payload)
            chunks = []
            while True:
                try:
                    c = s.recv(1 << 16)
                except socket.timeout as e:
                    raise BedError(f"{self.suite}: no reply within {timeout}s to {line[:60]}") from e
                if not c:
                    break
                chunks.append(c)
        return b"".join(chunks)

    def run(self, cmd: str, timeout: float = RUN_TIMEOUT_S, check: bool = False,
            connect_timeout: float = 10, reply_timeout: float | None = None) -> Result:
        """Run ``sh -c cmd`` in the guest; returns exit code, stdout, stderr.

        The guest kills the command after ``timeout`` seconds (exit code 137).
        """
        arg = base64.b64encode(cmd.encode()).decode()
        raw = self._request(f"RUN {int(timeout)} {arg}", timeout=reply_timeout or timeout + SOCKET_SLACK_S,
                            connect_timeout=connect_timeout)
        head, _, rest = raw.partition(b"\n")
        if not head.startswith(b"RC "):
            raise BedError(f"{self.suite}: bad agent reply {raw[:80]!r} to {cmd!r}")
        lines = rest.split(b"\n")
        if b"--" not in lines:
            raise BedError(f"{self.suite}: truncated agent reply to {cmd!r}")
        sep = lines.index(b"--")
        out = base64.b64decode(b"".join(lines[:sep])).decode(errors="replace")
        err = base64.b64decode(b"".join(lines[sep + 1:])).decode(errors="replace")
        res = Result(cmd, int(head[3:]), out, err)
        return res.check() if check else res

    def spawn(self, cmd: str) -> Spawned:
        """Start ``sh -c cmd`` in the background (own session); returns a handle."""
        arg = base64.b64encode(cmd.encode()).decode()
        raw = self._request(f"SPAWN 0 {arg}")
        parts = raw.split()
        if len(parts) != 3 or parts[0] != b"PID" or int(parts[1]) <= 0:
            raise BedError(f"{self.suite}: spawn of {cmd!r} failed: {raw[:80]!r}")
        return Spawned(self, cmd, int(parts[1]), int(parts[2]))

    def fetch(self, path: str, timeout: float = RUN_TIMEOUT_S) -> bytes:
        """Contents of a guest file (binary-safe)."""
        arg = base64.b64encode(path.encode()).decode()
        raw = self._request(f"FETCH 0 {arg}", timeout=timeout)
        head, _, rest = raw.partition(b"\n")
        if not head.startswith(b"OK "):
            raise BedError(f"{self.suite}: cannot fetch {path}: {head.decode(errors='replace')}")
        data = base64.b64decode(b"".join(rest.split()))
        if len(data) < int(head[3:]):
            raise BedError(f"{self.suite}: short read of {path}: {len(data)} of {int(head[3:])} bytes")
        return data

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a guest file."""
        arg = base64.b64encode(path.encode()).decode()
        payload = base64.b64encode(data)
        raw = self._request(f"PUT 0 {arg} {len(payload)}", payload)
        if raw.strip() != b"OK":
            raise BedError(f"{self.suite}: cannot write {path}: {raw[:80]!r}")
        self.run(f"chmod {mode:o} '{path}'", check=True)

    # ---- oracle
    @contextlib.contextmanager
    def capture(self, bpf: str = "tcp or udp") -> Iterator[Capture]:
        """Capture packets with tcpdump while the block runs; totals are filled in on exit.

        Captures on all interfaces (Linux cooked headers carry the direction
        the oracle needs); ``bpf`` narrows it.  The control channel's own
        traffic is always excluded.  An incomplete capture fails: tcpdump's
        exit statistics must show no packet dropped by the kernel, and the
        pcap must hold exactly the packets tcpdump says it captured.
        """
        self._captures += 1
        n = self._captures
        pcap = f"/tmp/bed/capture.{n}.pcap"
        proc = self.spawn(f"exec tcpdump -Z root -n -U --immediate-mode -s {CAPTURE_SNAPLEN} -i any -w {pcap} '({bpf}) and not port {GUEST_CONTROL_PORT}'")
        deadline = time.monotonic() + 30
        while "listening on" not in proc.log():
            if not proc.alive() or time.monotonic() > deadline:
                raise BedError(f"{self.suite}: tcpdump did not start: {proc.log()}")
            time.sleep(0.2)
        cap = Capture(pcap)
        try:
            yield cap
        finally:
            time.sleep(0.5)  # let in-flight packets reach the capture
            rc = proc.stop("INT")
            cap.pcap = self.fetch(pcap)
            (self.logdir / f"capture.{n}.pcap").write_bytes(cap.pcap)
        stats = capture_stats(proc.log())
        where = f"{self.suite}: capture {n} ({bpf}; {self.logdir / f'capture.{n}.pcap'})"
        if stats is None:
            raise BedError(f"{where}: tcpdump exited {rc} without its packet statistics, so the capture "
                           f"cannot be shown complete:\n{proc.log()}")
        if stats["dropped by kernel"]:
            raise BedError(f"{where}: the oracle is incomplete: tcpdump reports {stats['dropped by kernel']} "
                           f"packets dropped by kernel ({stats['captured']} captured); the flows cannot be "
                           f"checked against it")
        records = oracle.count_records(cap.pcap)
        if records != stats["captured"]:
            raise BedError(f"{where}: the pcap holds {records} packets, tcpdump says it captured "
                           f"{stats['captured']}")
        cap.packets = oracle.parse_pcap(cap.pcap)
        cap.totals = oracle.Totals(cap.packets)

    # ---- daemon
    def start_daemon(self, args: list[str] | None = None, wait: bool = True,
                     timeout: float = DAEMON_READY_TIMEOUT_S, binary: str | None = None) -> Spawned:
        """Start ``sockscope serve`` (the guest's ``binary``, default GUEST_DAEMON) in the
        guest; wait until gRPC health says SERVING."""
        if not self.with_daemon:
            raise BedError("this VM was booted without the daemon binary")
        argv = [binary or GUEST_DAEMON, "serve", "-E", f"server.listen=0.0.0.0:{GUEST_GRPC_PORT}",
                "-E", "server.insecure_listen=true"] + list(args or [])
        cmd = " ".join(f"'{a}'" for a in argv)
        self.daemon = self.spawn(f"exec {cmd} >{GUEST_DAEMON_LOG} 2>&1")
        if wait:
            self.wait_grpc_serving(timeout)
        return self.daemon

    def wait_grpc_serving(self, timeout: float = DAEMON_READY_TIMEOUT_S) -> None:
        import grpc  # imported lazily: the bed itself does not need grpcio
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.daemon is not None and not self.daemon.alive():
                raise BedError(f"{self.suite}: daemon exited with {self.daemon.returncode()}\n"
                               + self.daemon_log())
            try:
                with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                                timeout=5)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = f"status {resp.status}"
            except grpc.RpcError as e:
                last = f"{e.code()}: {e.details()}"
            time.sleep(1)
        raise BedError(f"{self.suite}: daemon gRPC health not SERVING after {timeout}s ({last})\n"
                       + self.daemon_log())

    def stop_daemon(self, sig: str = "TERM", timeout: float = 30) -> int:
        """Signal the daemon and return its exit status."""
        if self.daemon is None:
            raise BedError("daemon not started")
        rc = self.daemon.stop(sig, timeout)
        self.daemon = None
        return rc

    def daemon_log(self) -> str:
        try:
            return self.fetch(GUEST_DAEMON_LOG, timeout=20).decode(errors="replace")
        except (OSError, BedError) as e:
            return f"<daemon log unavailable: {e}>"

    # ---- diagnostics
    def console_tail(self, lines: int = 80) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "<no console log>"
        return "\n".join(text.splitlines()[-lines:])

    def diagnostics(self) -> str:
        alive = self.proc is not None and self.proc.poll() is None
        parts = [f"=== kernel {self.suite} ({self.kernel.release}), logs in {self.logdir}",
                 f"=== guest console (last lines of {self.console_log}):", self.console_tail()]
        try:
            qerr = (self.logdir / "qemu.stderr").read_text(errors="replace").strip()
        except OSError:
            qerr = ""
        if qerr:
            parts += ["=== qemu stderr:", qerr]
        if alive:
            parts += ["=== daemon log:", self.daemon_log()]
        return "\n".join(parts)


# --------------------------------------------------------------------------- try-it

TRY_WORKLOAD = r"""
httpd -p 8080 -h /www
nc -ll -p 9000 -e cat &
socat -u UDP6-RECV:9001,ipv6only=0 /dev/null &
i=0
while :; do
    i=$((i+1))
    wget -q -O /dev/null http://127.0.0.1:8080/index.html
    wget -q -O /dev/null "http://[::1]:8080/index.html"
    echo "tcp $i" | nc -w 1 10.0.2.15 9000 >/dev/null
    echo "udp $i" | socat -u - UDP4-SENDTO:127.0.0.1:9001
    echo "udp6 $i" | socat -u - UDP6-SENDTO:[::1]:9001
    sleep 2
done
"""


def try_it(suite: str, port: int) -> int:
    with VM(suite, with_daemon=True, shell=False, grpc_host_port=port) as vm:
        print(f"booted {suite} ({vm.kernel.release}) in {vm.boot_seconds:.1f}s; console log: {vm.console_log}")
        vm.start_daemon()
        vm.spawn(TRY_WORKLOAD)
        print(f"sockscope is serving gRPC on 127.0.0.1:{port} (guest {GUEST_GRPC_PORT}); try:\n"
              f"  grpcurl -plaintext 127.0.0.1:{port} list\n"
              f"  grpcurl -plaintext 127.0.0.1:{port} grpc.health.v1.Health/Check\n"
              f"daemon log in the guest: {GUEST_DAEMON_LOG}; Ctrl-C stops the VM.")
        try:
            while vm.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nstopping")
        (vm.logdir / "sockscope.log").write_text(vm.daemon_log())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("try", help="boot with the daemon and a workload; gRPC on 127.0.0.1:PORT")
    t.add_argument("suite", choices=kernels.SUITES)
    t.add_argument("--port", type=int, default=GUEST_GRPC_PORT)
    b = sub.add_parser("boot", help="boot and attach the console (Ctrl-A X quits)")
    b.add_argument("suite", choices=kernels.SUITES)
    f = sub.add_parser("fetch", help="download and unpack kernels")
    f.add_argument("suites", nargs="*", default=list(kernels.SUITES))
    a = ap.parse_args(argv)
    if a.cmd == "try":
        return try_it(a.suite, a.port)
    if a.cmd == "boot":
        vm = VM(a.suite, shell=True)
        vm.start()
        vm.proc.wait()
        return 0
    for s in a.suites:
        print(kernels.fetch(s).to_json())
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    sys.exit(main())
