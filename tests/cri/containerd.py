"""A private containerd with its CRI plugin, for tests against a real runtime.

``PrivateContainerd`` runs its own containerd: root, state, sockets, config,
CNI configuration, IPAM data and log all live in one temporary directory, so
it never touches the system's ``/run/containerd`` and can run beside another
containerd.  Images are built here, without any registry: ``oci_archive``
writes an OCI image archive holding the static busybox, which is imported with
``ctr images import`` and serves both as the sandbox ("pause") image and as
the workload image.  ``CriClient`` speaks ``runtime.v1.RuntimeService`` over
the CRI socket with stubs compiled from ``proto/cri/runtime.proto`` at import
time, and creates pods and containers the way kubelet names and labels them.

    with PrivateContainerd() as rt:
        pod = rt.cri.run_pod("web-5d8f9c7b6-x2x4q", "shop", labels={"app": "web"})
        cid = rt.cri.create_container(pod, "web", rt.image, ["sleep", "3600"])
        pid = rt.container_pid(cid)

The only things outside the temporary directory are those containerd 1.6
always puts in fixed places: shim sockets in ``/run/containerd/s/`` (named by
a hash of this instance's socket path), network namespaces in
``/var/run/netns/cni-*`` and the pod cgroups ``/kubepods/besteffort/pod<uid>``;
all are removed when the pods are.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROTO = REPO / "proto" / "cri" / "runtime.proto"

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
RUNC = shutil.which("runc") or "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"
CNI_BIN_DIR = "/usr/lib/cni"

#: Image names: a "localhost/" domain so that CRI's reference normalisation
#: keeps them as they are and never tries to pull them.
IMAGE = "localhost/sockscope-test/busybox:1"
PAUSE_IMAGE = "localhost/sockscope-test/pause:1"

#: Seconds a CRI call may take before the client gives up.
CALL_TIMEOUT_S = 20


class RuntimeError_(RuntimeError):
    """The private containerd could not be set up or did not answer."""


# --------------------------------------------------------------------------
# CRI stubs, compiled from the project's proto at import time.


def _compile_stubs():
    from grpc_tools import protoc
    import grpc_tools

    if not PROTO.exists():
        raise RuntimeError_(f"{PROTO} does not exist")
    out = tempfile.mkdtemp(prefix="sockscope-cri-stubs-")
    atexit.register(shutil.rmtree, out, True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"-I{well_known}",
                      f"--python_out={out}", f"--grpc_python_out={out}", str(PROTO)])
    if rc != 0:
        raise RuntimeError_(f"protoc failed ({rc}) on {PROTO}")
    sys.path.insert(0, out)
    try:
        import runtime_pb2
        import runtime_pb2_grpc
    finally:
        sys.path.remove(out)
    return runtime_pb2, runtime_pb2_grpc


pb2, pb2_grpc = _compile_stubs()


def to_dict(message) -> dict:
    """A message as protobuf JSON, proto field names kept, defaults included."""
    from google.protobuf import json_format

    try:
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 26
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         including_default_value_fields=True)


# --------------------------------------------------------------------------
# Images.


def _applets() -> list[str]:
    out = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True).stdout
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def _layer_tar() -> bytes:
    """One uncompressed layer: /bin/busybox, a link per applet, a minimal /etc."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add_dir(name, mode=0o755):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)

        def add_file(name, data: bytes, mode=0o644):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "dev", "etc", "proc", "root", "sys", "var"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
        for applet in _applets():
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            info.mode = 0o777
            tar.addfile(info)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def oci_archive(path: Path, images: dict[str, list[str]]) -> Path:
    """Write an OCI image archive with one image per ``name -> entrypoint``.

    All images share the one busybox layer; each has its own config (its
    entrypoint) and manifest, named in index.json by the
    ``io.containerd.image.name`` annotation that ``ctr images import`` reads.
    """
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layer = _layer_tar()
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(layer)}
    manifests = []
    for name, entrypoint in images.items():
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {"Entrypoint": entrypoint,
                       "Env": ["PATH=/bin:/sbin:/usr/bin:/usr/sbin"],
                       "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
            "history": [{"created": "2024-01-01T00:00:00Z",
                         "created_by": f"busybox-static {BUSYBOX} with its applet links"}],
        }
        config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                       **blob(json.dumps(config, sort_keys=True).encode())}
        manifest = {"schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": config_desc, "layers": [layer_desc]}
        manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                          **blob(json.dumps(manifest, sort_keys=True).encode()),
                          "platform": {"architecture": "amd64", "os": "linux"},
                          "annotations": {"io.containerd.image.name": name,
                                          "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}})
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": manifests}

    with tarfile.open(path, "w") as tar:
        def add(name, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":", 1)[1], data)
    return path


# --------------------------------------------------------------------------
# The CRI client.


def pod_config(name: str, namespace: str, uid: str, labels: dict | None = None,
               annotations: dict | None = None, host_network: bool = True,
               log_root: Path | None = None) -> "pb2.PodSandboxConfig":
    """A sandbox config as kubelet builds it for a pod."""
    all_labels = dict(labels or {})
    all_labels.update({"io.kubernetes.pod.name": name,
                       "io.kubernetes.pod.namespace": namespace,
                       "io.kubernetes.pod.uid": uid})
    all_annotations = {"kubernetes.io/config.source": "api",
                       "kubernetes.io/config.seen": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                       + f".{time.time_ns() % 1_000_000_000:09d}Z"}
    all_annotations.update(annotations or {})
    mode = pb2.NODE if host_network else pb2.POD
    log_dir = (log_root or Path("/var/log/pods")) / f"{namespace}_{name}_{uid}"
    return pb2.PodSandboxConfig(
        metadata=pb2.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
        hostname="" if host_network else name,
        log_directory=str(log_dir),
        labels=all_labels,
        annotations=all_annotations,
        linux=pb2.LinuxPodSandboxConfig(
            # kubelet's cgroupfs driver layout for a pod without resources.
            cgroup_parent=f"/kubepods/besteffort/pod{uid}",
            security_context=pb2.LinuxSandboxSecurityContext(
                namespace_options=pb2.NamespaceOption(network=mode, pid=pb2.CONTAINER,
                                                      ipc=pb2.POD))))


class CriClient:
    """``runtime.v1.RuntimeService`` over ``unix://SOCK`` (or any gRPC target)."""

    def __init__(self, target: str, log_root: Path | None = None):
        self.target = target
        self.log_root = log_root
        self.channel = grpc.insecure_channel(target)
        self.stub = pb2_grpc.RuntimeServiceStub(self.channel)
        #: sandbox id -> the PodSandboxConfig it was made from
        self.sandbox_configs: dict[str, object] = {}
        #: every pod cgroup asked for, also by a RunPodSandbox that failed
        self.cgroup_parents: set[str] = set()

    def close(self):
        self.channel.close()

    def call(self, method: str, request, timeout: float = CALL_TIMEOUT_S):
        return getattr(self.stub, method)(request, timeout=timeout)

    # reads
    def version(self, timeout: float = CALL_TIMEOUT_S):
        return self.call("Version", pb2.VersionRequest(version="v1"), timeout)

    def list_pod_sandbox(self, **filter_):
        req = pb2.ListPodSandboxRequest(filter=pb2.PodSandboxFilter(**filter_)) if filter_ \
            else pb2.ListPodSandboxRequest()
        return self.call("ListPodSandbox", req)

    def list_containers(self, **filter_):
        req = pb2.ListContainersRequest(filter=pb2.ContainerFilter(**filter_)) if filter_ \
            else pb2.ListContainersRequest()
        return self.call("ListContainers", req)

    def pod_sandbox_status(self, sandbox_id: str):
        return self.call("PodSandboxStatus", pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id))

    def pod_ips(self, sandbox_id: str) -> list[str]:
        net = self.pod_sandbox_status(sandbox_id).status.network
        return [ip for ip in [net.ip, *(a.ip for a in net.additional_ips)] if ip]

    # writes
    def run_pod(self, name: str, namespace: str, uid: str | None = None,
                labels: dict | None = None, annotations: dict | None = None,
                host_network: bool = True) -> str:
        """Run a pod sandbox as kubelet would for this pod; returns its id."""
        uid = uid or str(uuid.uuid4())
        config = pod_config(name, namespace, uid, labels, annotations, host_network, self.log_root)
        self.cgroup_parents.add(config.linux.cgroup_parent)
        if self.log_root is not None:
            # kubelet makes the pod's log directory before RunPodSandbox.
            Path(config.log_directory).mkdir(parents=True, exist_ok=True)
        sid = self.call("RunPodSandbox", pb2.RunPodSandboxRequest(config=config),
                        timeout=60).pod_sandbox_id
        self.sandbox_configs[sid] = config
        return sid

    def create_container(self, sandbox_id: str, name: str, image: str, command: list[str],
                         labels: dict | None = None, annotations: dict | None = None,
                         sandbox_config=None, start: bool = True) -> str:
        """Create (and start) a container in a sandbox, labelled as kubelet does."""
        sandbox_config = sandbox_config or self.sandbox_configs[sandbox_id]
        meta = sandbox_config.metadata
        all_labels = {"io.kubernetes.container.name": name,
                      "io.kubernetes.pod.name": meta.name,
                      "io.kubernetes.pod.namespace": meta.namespace,
                      "io.kubernetes.pod.uid": meta.uid}
        all_labels.update(labels or {})
        all_annotations = {"io.kubernetes.container.hash": hashlib.sha256(name.encode()).hexdigest()[:8],
                           "io.kubernetes.container.restartCount": "0",
                           "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
                           "io.kubernetes.container.terminationMessagePolicy": "File",
                           "io.kubernetes.pod.terminationGracePeriod": "30"}
        all_annotations.update(annotations or {})
        ns = sandbox_config.linux.security_context.namespace_options
        config = pb2.ContainerConfig(
            metadata=pb2.ContainerMetadata(name=name, attempt=0),
            image=pb2.ImageSpec(image=image),
            command=command,
            labels=all_labels,
            annotations=all_annotations,
            log_path=f"{name}/0.log",
            linux=pb2.LinuxContainerConfig(security_context=pb2.LinuxContainerSecurityContext(
                namespace_options=pb2.NamespaceOption(network=ns.network, pid=ns.pid, ipc=ns.ipc))))
        cid = self.call("CreateContainer", pb2.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config),
            timeout=60).container_id
        if start:
            self.start_container(cid)
        return cid

    def start_container(self, container_id: str):
        self.call("StartContainer", pb2.StartContainerRequest(container_id=container_id), timeout=60)

    def stop_container(self, container_id: str, timeout_s: int = 0):
        self.call("StopContainer", pb2.StopContainerRequest(container_id=container_id,
                                                            timeout=timeout_s), timeout=60)

    def remove_container(self, container_id: str):
        self.call("RemoveContainer", pb2.RemoveContainerRequest(container_id=container_id), timeout=60)

    def stop_pod(self, sandbox_id: str):
        self.call("StopPodSandbox", pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)

    def remove_pod(self, sandbox_id: str):
        """Stop and remove a sandbox and its containers, and its pod cgroup."""
        config = self.sandbox_configs.pop(sandbox_id, None)
        self.stop_pod(sandbox_id)
        self.call("RemovePodSandbox", pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                  timeout=60)
        if config is not None:
            _remove_cgroup(config.linux.cgroup_parent)


def _remove_cgroup(path: str):
    """Remove an (empty) cgroup and its empty parents up to /kubepods, in each hierarchy."""
    if not path:
        return
    root = Path("/sys/fs/cgroup")
    parts = Path(path.lstrip("/")).parts
    for hierarchy in [root, *(p for p in root.iterdir() if p.is_dir())]:
        for n in range(len(parts), 0, -1):
            d = hierarchy.joinpath(*parts[:n])
            if not d.is_dir():
                continue
            if any(c.is_dir() for c in d.iterdir()):
                break
            try:
                d.rmdir()
            except OSError:
                break


# --------------------------------------------------------------------------
# CNI.


def _used_ipv4_networks() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    out = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        dst = line.split()[0]
        if dst != "default":
            try:
                nets.append(ipaddress.ip_network(dst, strict=False))
            except ValueError:
                pass
    return nets


def free_subnet() -> str:
    """10.88.0.0/16, or the next 10.N.0.0/16 not used on this host (another
    containerd may have its bridge on 10.88)."""
    used = _used_ipv4_networks()
    for n in range(88, 120):
        net = ipaddress.ip_network(f"10.{n}.0.0/16")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError_("no free 10.N.0.0/16 subnet for the pod network")


def cni_conflist(name: str, bridge: str, subnet: str, ipam_dir: Path) -> dict:
    """A bridge network with host-local IPAM: pods get an address of ``subnet``
    on their own veth, the bridge is their gateway (the host side, ``.1``).
    No masquerading and no port mappings, so the host's iptables are left alone."""
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {"type": "host-local",
                     "ranges": [[{"subnet": subnet}]],
                     "routes": [{"dst": "0.0.0.0/0"}],
                     # host-local keeps its leases here instead of /var/lib/cni.
                     "dataDir": str(ipam_dir)},
        }],
    }


# --------------------------------------------------------------------------
# containerd.


def _toml_str(s: str) -> str:
    return json.dumps(str(s))


CONFIG_TEMPLATE = """\
version = 2
root = {root}
state = {state}
# containerd's own OOM score is left as it is: lowering it needs CAP_SYS_RESOURCE,
# which this machine does not grant.
oom_score = 0
# Snapshotters and tracing that cannot work here or are not needed; disabling
# them only keeps their start-up errors out of the log.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {sock}
[ttrpc]
  address = {ttrpc_sock}
[debug]
  # No debug socket (its default would be under /run/containerd).
  address = ""
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  # Instead of /opt/containerd.
  path = {opt}

[plugins."io.containerd.grpc.v1.cri"]
  # The locally built image; it is imported before any pod is run, so CRI
  # never tries to pull it.
  sandbox_image = {pause_image}
  # The streaming server (exec/attach/port-forward) defaults to port 10010 on
  # all addresses; a random loopback port lets two instances run side by side.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # CRI gives sandboxes oom_score_adj -998 and containers their QoS score.
  # Lowering a score below containerd's own needs CAP_SYS_RESOURCE, which this
  # machine does not grant (runc would fail writing /proc/PID/oom_score_adj);
  # this option clamps every score to containerd's own instead.  Without it
  # every RunPodSandbox fails ("runc create failed: unable to start container
  # process: can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  # No AppArmor on this machine (/sys/kernel/security holds no apparmor), so
  # CRI would not ask for a profile anyway; explicit, for hosts that have it
  # without containerd's default profile loaded.
  disable_apparmor = true
  enable_selinux = false
  # Cgroups do work here (cgroup v1 hierarchies, writable as root), so pods
  # get kubelet's cgroupfs layout and /proc/PID/cgroup names the container.
  disable_cgroup = false
  # No hugetlb controller is mounted here: neither set hugepage limits nor
  # fail because the controller is missing (both are 1.6's defaults).
  disable_hugetlb_controller = true
  tolerate_missing_hugetlb_controller = true
  # Keep the host's /proc masking defaults.
  disable_proc_mount = false
  # Do not change the ping range and unprivileged port start in pod netns.
  enable_unprivileged_ports = false
  enable_unprivileged_icmp = false

  [plugins."io.containerd.grpc.v1.cri".containerd]
    # overlayfs works on this machine's ext4 root.
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = {runc}
        # runc's state directory, instead of /run/containerd/runc.
        Root = {runc_root}
        # No systemd manages this machine's cgroups: runc writes the cgroupfs
        # hierarchies itself, and the pods' cgroup parents are in cgroupfs form
        # (kubelet's "cgroupfs" driver).  With true, runc refuses them
        # ('expected cgroupsPath to be of format "slice:prefix:name"').
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {cni_bin}
    conf_dir = {cni_conf}
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".registry]
    # An empty hosts directory instead of /etc/containerd/certs.d.
    config_path = {certs_d}
"""


class PrivateContainerd:
    """A containerd of its own, with CRI, images imported, optionally a pod network.

    ``start()`` (re)starts it on the same root and socket, ``stop()`` stops
    the daemon (its shims and containers keep running, as with a real
    containerd restart), ``pause()``/``resume()`` send SIGSTOP/SIGCONT.
    ``close()`` removes every pod, stops it and deletes the directory.
    """

    def __init__(self, workdir: Path | str | None = None, cni: bool = True,
                 start_timeout_s: float = 30):
        self.owns_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="sockscope-containerd-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 107 bytes; keep them short.
        self.socket = self.dir / "c.sock"
        self.endpoint = f"unix://{self.socket}"
        self.log_path = self.dir / "containerd.log"
        self.config_path = self.dir / "config.toml"
        self.start_timeout_s = start_timeout_s
        self.image = IMAGE
        self.pause_image = PAUSE_IMAGE
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self.cri: CriClient | None = None
        self.version: str | None = None
        tag = hashlib.sha256(str(self.dir).encode()).hexdigest()[:6]
        self.cni_wanted = cni
        self.cni_subnet = None
        self.cni_bridge = f"ssc{tag}"
        self.cni_error: str | None = None
        # The bridge plugin turns on IPv4 forwarding for a gateway bridge; the
        # value before is put back by close() (pods only need to reach the
        # host's own bridge address, which is no forwarding).
        self._ip_forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        self._check_tools()
        self._write_config()

    # setup

    @staticmethod
    def _check_tools():
        missing = [t for t in (CONTAINERD, CTR, RUNC, BUSYBOX) if not os.access(t, os.X_OK)]
        if missing:
            raise RuntimeError_("the CRI test bed needs containerd, ctr, runc and busybox-static "
                                f"(apt-get install containerd runc busybox-static); missing: {missing}")
        if os.geteuid() != 0:
            raise RuntimeError_("the CRI test bed runs containerd and must run as root")

    def _write_config(self):
        d = self.dir
        for sub in ("root", "state", "opt", "runc", "certs.d", "cni/net.d", "cni/ipam", "pods"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        if self.cni_wanted:
            missing = [p for p in ("bridge", "host-local", "loopback")
                       if not os.access(os.path.join(CNI_BIN_DIR, p), os.X_OK)]
            if missing:
                self.cni_error = (f"CNI plugins {missing} missing in {CNI_BIN_DIR} "
                                  "(apt-get install containernetworking-plugins)")
            else:
                self.cni_subnet = free_subnet()
                conf = cni_conflist(f"sockscope-{self.cni_bridge}", self.cni_bridge,
                                    self.cni_subnet, d / "cni/ipam")
                (d / "cni/net.d/10-sockscope.conflist").write_text(json.dumps(conf, indent=2))
        self.config_path.write_text(CONFIG_TEMPLATE.format(
            root=_toml_str(d / "root"), state=_toml_str(d / "state"),
            sock=_toml_str(self.socket), ttrpc_sock=_toml_str(f"{self.socket}.ttrpc"),
            opt=_toml_str(d / "opt"), pause_image=_toml_str(self.pause_image),
            runc=_toml_str(RUNC), runc_root=_toml_str(d / "runc"),
            cni_bin=_toml_str(CNI_BIN_DIR), cni_conf=_toml_str(d / "cni/net.d"),
            certs_d=_toml_str(d / "certs.d")))

    # lifecycle

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        """Start containerd (again) and wait until CRI answers Version."""
        if self.running:
            return
        first = not (self.dir / "root" / "io.containerd.content.v1.content").exists()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            # Its own session and process group: a Ctrl-C of the test run does
            # not reach it before close() stops it cleanly.
            self.proc = subprocess.Popen([CONTAINERD, "--config", str(self.config_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self.paused = False
        if self.cri is None:
            self.cri = CriClient(self.endpoint, log_root=self.dir / "pods")
        self._wait_ready()
        if first:
            self.import_images()

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError_(f"containerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket.exists():
                try:
                    v = self.cri.version(timeout=2)
                    self.version = v.runtime_version
                    return
                except grpc.RpcError as e:
                    last = f"{e.code()}: {e.details()}"
            time.sleep(0.2)
        raise RuntimeError_(f"containerd's CRI did not answer Version within {self.start_timeout_s} s "
                            f"({last}):\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15):
        """Stop the daemon (SIGTERM, then SIGKILL); shims and containers stay."""
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def pause(self):
        """SIGSTOP containerd: its socket still accepts connections, nothing answers."""
        assert self.running, "containerd is not running"
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self):
        if self.proc is not None and self.paused:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def close(self):
        """Remove all pods, stop containerd and its shims, delete the directory."""
        if self.cri is not None and not self.running:
            # Stopped by a test: started again so that CRI removes the pods
            # with their network namespaces and IP leases.
            try:
                self.start()
            except RuntimeError_ as e:
                print(f"containerd.close: cannot restart to clean up: {e}", file=sys.stderr)
        if self.running:
            self.resume()
            try:
                for sb in self.cri.list_pod_sandbox().items:
                    try:
                        self.cri.remove_pod(sb.id)
                    except grpc.RpcError as e:
                        print(f"containerd.close: removing sandbox {sb.id}: {e.details()}",
                              file=sys.stderr)
            except grpc.RpcError as e:
                print(f"containerd.close: listing sandboxes: {e.details()}", file=sys.stderr)
        self.stop()
        self._kill_leftover_containers()
        self._kill_shims()
        for path in sorted(self.cri.cgroup_parents) if self.cri else []:
            _remove_cgroup(path)
        if self.cri is not None:
            self.cri.close()
            self.cri = None
        self._remove_bridge()
        if self.owns_dir:
            if self._unmount_all():
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                print(f"containerd.close: mounts remain under {self.dir}; left in place",
                      file=sys.stderr)

    def _shim_pids(self) -> list[int]:
        """containerd-shim-runc-v2 processes started by this instance (by -address)."""
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and \
                    str(self.socket).encode() in argv:
                pids.append(int(p.name))
        return pids

    def _kill_leftover_containers(self):
        """Containers CRI could not remove: killed and deleted through runc,
        in this instance's own runc state directory."""
        root = self.dir / "runc" / "k8s.io"
        if not root.is_dir():
            return
        r = subprocess.run([RUNC, "--root", str(root), "list", "-q"], capture_output=True, text=True)
        for cid in r.stdout.split():
            subprocess.run([RUNC, "--root", str(root), "delete", "--force", cid], capture_output=True)

    def _kill_shims(self):
        for pid in self._shim_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _remove_bridge(self):
        if not self.cni_subnet:
            return
        subprocess.run(["ip", "link", "del", self.cni_bridge], capture_output=True)
        others = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"],
                                capture_output=True, text=True).stdout
        fwd = Path("/proc/sys/net/ipv4/ip_forward")
        if self._ip_forward_before == "0" and " ssc" not in others and fwd.read_text().strip() == "1":
            fwd.write_text("0")

    def _unmount_all(self) -> bool:
        prefix = str(self.dir) + "/"
        for _ in range(3):
            mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
            mine = sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True)
            if not mine:
                return True
            for m in mine:
                subprocess.run(["umount", "-l", m], capture_output=True)
        return False

    # helpers

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def ctr(self, *args: str, timeout: float = 60) -> str:
        r = subprocess.run([CTR, "-a", str(self.socket), "-n", "k8s.io", *args],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError_(f"ctr {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def import_images(self):
        """Build the busybox image archive and import it as both images."""
        archive = oci_archive(self.dir / "images.tar", {
            # The sandbox's only process: sleeps until CRI kills it.
            self.pause_image: ["/bin/sleep", "2147483647"],
            self.image: ["/bin/sh"],
        })
        self.ctr("images", "import", "--snapshotter", "overlayfs", str(archive))
        # CRI learns of imported images through containerd's events; wait
        # until it has them, or RunPodSandbox would try to pull the pause image.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            names = self.ctr("images", "ls", "-q").split()
            if self.pause_image in names and self.image in names:
                return
            time.sleep(0.2)
        raise RuntimeError_(f"imported images not listed: {names}")

    def container_pid(self, container_id: str) -> int:
        """The host pid of a container's (or sandbox's) init process."""
        for line in self.ctr("tasks", "ls").splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == container_id:
                return int(parts[1])
        raise RuntimeError_(f"no task for container {container_id}")

    def runtime_name(self) -> str:
        return f"containerd {self.version}"


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


if __name__ == "__main__":
    # Smoke run: start, run a pod with a container, print what CRI reports.
    with PrivateContainerd() as rt:
        print("runtime", rt.runtime_name(), "socket", rt.socket, "subnet", rt.cni_subnet)
        hn = "--pod-network" not in sys.argv
        sid = rt.cri.run_pod("smoke", "default", labels={"app": "smoke"}, host_network=hn)
        cid = rt.cri.create_container(sid, "main", rt.image, ["sh", "-c", "sleep 3600"])
        pid = rt.container_pid(cid)
        print("sandbox", sid, "container", cid, "pid", pid, "ips", rt.cri.pod_ips(sid))
        print(Path(f"/proc/{pid}/cgroup").read_text())
        print(json.dumps(to_dict(rt.cri.list_containers()), indent=1)[:2000])
