"""``sockscope pods`` against a real containerd (CRI) with real containers.

Each container is a real process on this host, started by containerd and
runc from the locally built busybox image; ``sockscope pods --pid`` must name
its pod as kubelet described it to the runtime, and keep answering, within
bounded time, while the runtime is stopped, restarted or frozen.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import containerd as cd  # noqa: E402

#: How long one non-follow ``sockscope pods`` run may take.
RUN_TIMEOUT_S = 30
#: A lookup against a frozen runtime must come back within this.
FROZEN_LOOKUP_BOUND_S = 10
#: How long one --follow round (1 s interval) may take to appear.
ROUND_TIMEOUT_S = 15

#: Labels kubelet adds to a sandbox's labels for the runtime (not pod labels).
KUBELET_SANDBOX_LABELS = ("io.kubernetes.pod.name", "io.kubernetes.pod.namespace",
                          "io.kubernetes.pod.uid")

HEX64 = re.compile(r"^[0-9a-f]{64}$")

#: ``kubernetes.annotations`` of the identity checks: pod annotations are
#: reported only when selected (none by default), by key or by prefix ending in ``*``.
ANNOTATION_SELECTION = ["sockscope.test/*", "kubernetes.io/config.source"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A configuration file selecting ANNOTATION_SELECTION."""
    path = tmp_path_factory.mktemp("config") / "sockscope.yaml"
    path.write_text("kubernetes:\n  annotations: " + json.dumps(ANNOTATION_SELECTION) + "\n")
    return path


def selected(annotations: dict, selection=ANNOTATION_SELECTION) -> dict:
    return {k: v for k, v in annotations.items()
            if any(k == s or (s.endswith("*") and k.startswith(s[:-1])) for s in selection)}


# --------------------------------------------------------------------------
# Running the CLI.


def parse_lines(stdout: str, argv) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{' '.join(map(str, argv))} printed a line that is not JSON: {line!r}\n"
                        f"whole output:\n{stdout}")
    return out


def pods_cmd(sockscope, endpoint, *args) -> list[str]:
    return [str(sockscope), "pods", "--runtime-endpoint", endpoint, *map(str, args)]


def run_pods(sockscope, endpoint, *args, timeout=RUN_TIMEOUT_S):
    """Run ``sockscope pods``; returns (exit code, JSON lines, stderr, seconds)."""
    argv = pods_cmd(sockscope, endpoint, *args)
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout} s; "
                    f"stdout so far: {e.stdout!r} stderr: {e.stderr!r}")
    return r.returncode, parse_lines(r.stdout, argv), r.stderr, time.monotonic() - t0


def lookup(sockscope, rt, *pids, config=None) -> list[dict]:
    """``sockscope pods [-c CONFIG] --pid P...`` (exit code 0 expected): one line per pid."""
    args = (["-c", config] if config else []) + [a for p in pids for a in ("--pid", p)]
    rc, lines, err, _ = run_pods(sockscope, rt.endpoint, *args)
    assert rc == 0, f"sockscope pods {' '.join(map(str, args))} exited {rc}; stderr: {err}"
    assert [ln.get("pid") for ln in lines] == list(pids), \
        f"expected one line per pid {pids}, got:\n" + "\n".join(map(json.dumps, lines))
    return lines


class Follow:
    """A running ``sockscope pods --follow``, read round by round."""

    def __init__(self, argv):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue = queue.Queue()
        self.raw: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True).start()

    def _read(self, stream, is_stdout):
        for line in stream:
            if is_stdout:
                self.raw.append(line)
                self.lines.put(line)
            else:
                self.stderr.append(line)
        if is_stdout:
            self.lines.put(None)

    def context(self) -> str:
        return (f"command: {' '.join(map(str, self.argv))}\nstdout:\n{''.join(self.raw)}"
                f"stderr:\n{''.join(self.stderr)}")

    def round(self, timeout=ROUND_TIMEOUT_S) -> tuple[list[dict], dict]:
        """The next round: its record lines and its status."""
        records = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no complete --follow round within {timeout} s\n{self.context()}")
            if line is None:
                pytest.fail(f"sockscope pods --follow ended (exit {self.proc.wait()}) "
                            f"in the middle of waiting for a round\n{self.context()}")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"--follow printed a line that is not JSON: {line!r}\n{self.context()}")
            if "status" in obj:
                return records, obj["status"]
            records.append(obj)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --------------------------------------------------------------------------
# Pods.


def hello_command(message: str, host: str, port: int) -> list[str]:
    """A real TCP connection to the test's listener, then sleep as the container's init."""
    return ["sh", "-c", f"echo {message} | nc -w 5 {host} {port}; exec sleep 3600"]


def make_pod(rt, listener, name, namespace, labels, container, annotations=None,
             host_network=True, uid=None):
    """A pod with one container that connects to ``listener`` and sleeps."""
    uid = uid or str(uuid.uuid4())
    sid = rt.cri.run_pod(name, namespace, uid=uid, labels=labels, annotations=annotations,
                         host_network=host_network)
    if host_network:
        host = "127.0.0.1"
    else:
        # The bridge, the pods' gateway, holds the first address.
        host = str(next(ipaddress.ip_network(rt.cni_subnet).hosts()))
    message = f"hello-{namespace}-{name}"
    cid = rt.cri.create_container(sid, container, rt.image,
                                  hello_command(message, host, listener.port))
    pid = rt.container_pid(cid)
    return {"name": name, "namespace": namespace, "uid": uid, "labels": labels,
            "container": container, "sandbox_id": sid, "container_id": cid, "pid": pid,
            "message": message}


def sandbox_annotations(rt, sid) -> dict:
    return dict(rt.cri.list_pod_sandbox(id=sid).items[0].annotations)


def pod_labels(reported: dict, pod: dict) -> dict:
    """The reported labels without the io.kubernetes.pod.* entries kubelet adds
    to the sandbox, which are accepted when present but must then be right."""
    labels = dict(reported or {})
    want = {"io.kubernetes.pod.name": pod["name"], "io.kubernetes.pod.namespace": pod["namespace"],
            "io.kubernetes.pod.uid": pod["uid"]}
    for key in KUBELET_SANDBOX_LABELS:
        if key in labels:
            assert labels.pop(key) == want[key], f"label {key} wrong in {reported}"
    return labels


def check_identity(line: dict, pod: dict, rt, workload: tuple[str, str], ips=(),
                   selection=ANNOTATION_SELECTION):
    """One ``--pid`` answer names ``pod`` exactly (annotations: those ``selection`` selects)."""
    shown = json.dumps(line, sort_keys=True)
    cgroup = Path(f"/proc/{pod['pid']}/cgroup").read_text()
    assert pod["container_id"] in cgroup, \
        f"container {pod['container_id']} not in /proc/{pod['pid']}/cgroup:\n{cgroup}"
    assert line["container_id"] == pod["container_id"], \
        f"pid {pod['pid']}: container_id; /proc/{pod['pid']}/cgroup:\n{cgroup}\nline: {shown}"
    p = line.get("pod")
    assert p is not None, f"pid {pod['pid']} ({pod['name']}): no pod; line: {shown}"
    got = {"name": p.get("name"), "namespace": p.get("namespace"), "uid": p.get("uid"),
           "labels": pod_labels(p.get("labels"), pod), "annotations": p.get("annotations"),
           "workload": p.get("workload"), "container_name": p.get("container_name"),
           "image": p.get("image"), "ips": p.get("ips")}
    want = {"name": pod["name"], "namespace": pod["namespace"], "uid": pod["uid"],
            "labels": pod["labels"],
            "annotations": selected(sandbox_annotations(rt, pod["sandbox_id"]), selection),
            "workload": {"kind": workload[0], "name": workload[1]},
            "container_name": pod["container"], "image": rt.image, "ips": list(ips)}
    diff = {k: {"got": got[k], "want": want[k]} for k in want if got[k] != want[k]}
    assert not diff, (f"pid {pod['pid']} ({pod['name']}): {json.dumps(diff, indent=1)}\nline: {shown}\n"
                      f"/proc/{pod['pid']}/cgroup:\n{cgroup}")


# The five kinds of workload, by the labels and names their controllers give.
WORKLOAD_PODS = [
    dict(name="web-5d8f9c7b6-x2x4q", namespace="shop", container="web",
         labels={"app": "web", "pod-template-hash": "5d8f9c7b6"},
         workload=("Deployment", "web")),
    dict(name="db-0", namespace="shop", container="postgres",
         labels={"app": "db", "controller-revision-hash": "db-7b9c8d6f5",
                 "statefulset.kubernetes.io/pod-name": "db-0"},
         workload=("StatefulSet", "db")),
    dict(name="agent-k7m2p", namespace="kube-system", container="agent",
         labels={"app": "agent", "controller-revision-hash": "6c8d9f7b5",
                 "pod-template-generation": "3"},
         workload=("DaemonSet", "agent")),
    dict(name="backup-28891230-7kq2p", namespace="ops", container="backup",
         labels={"batch.kubernetes.io/job-name": "backup-28891230", "job-name": "backup-28891230",
                 "batch.kubernetes.io/controller-uid": "3f6c1d9e-2a47-4b8e-9c0d-5e7f8a1b2c3d",
                 "controller-uid": "3f6c1d9e-2a47-4b8e-9c0d-5e7f8a1b2c3d"},
         workload=("CronJob", "backup")),
    dict(name="debug", namespace="default", container="debug",
         labels={"run": "debug"},
         workload=("Pod", "debug")),
]


# --------------------------------------------------------------------------
# Tests.


def test_workload_pods_resolve_by_pid(runtime, listener, sockscope, config):
    """(a) Five pods of five workload kinds: each container's pid names its pod."""
    rt = runtime
    pods = []
    for spec in WORKLOAD_PODS:
        pod = make_pod(rt, listener, spec["name"], spec["namespace"], spec["labels"],
                       spec["container"], annotations={"sockscope.test/kind": spec["workload"][0]})
        pod["workload"] = spec["workload"]
        pods.append(pod)
    # Each container made its real TCP connection to the host before sleeping.
    cd.wait_for(lambda: all(listener.got(p["message"]) for p in pods), 15,
                what="every container's connection to the listener")
    for pod in pods:
        assert listener.got(pod["message"]) == ["127.0.0.1"]
        [line] = lookup(sockscope, rt, pod["pid"], config=config)
        check_identity(line, pod, rt, pod["workload"])
    # All pids at once: one line per pid, in order; no annotations by default.
    lines = lookup(sockscope, rt, *[p["pid"] for p in pods])
    for line, pod in zip(lines, pods):
        check_identity(line, pod, rt, pod["workload"], selection=[])
    # A process outside any container: no container, no pod.
    [mine] = lookup(sockscope, rt, os.getpid())
    assert mine["container_id"] is None and mine["pod"] is None, json.dumps(mine)
    # Without --pid: one line per container the runtime lists.
    rc, listed, err, _ = run_pods(sockscope, rt.endpoint)
    assert rc == 0, err
    runtime_ids = sorted(c.id for c in rt.cri.list_containers().containers)
    assert sorted(x["container_id"] for x in listed) == runtime_ids, \
        "\n".join(map(json.dumps, listed))
    assert all(HEX64.match(x["container_id"]) for x in listed), "\n".join(map(json.dumps, listed))
    by_id = {x["container_id"]: x for x in listed}
    for pod in pods:
        entry = by_id[pod["container_id"]]
        assert entry["pod"]["name"] == pod["name"], json.dumps(entry)
        assert entry["pod"]["workload"] == dict(zip(("kind", "name"), pod["workload"])), \
            json.dumps(entry)
        assert entry["pod"]["container_name"] == pod["container"], json.dumps(entry)


def test_pod_network_ips(runtime, listener, sockscope, config):
    """A pod on the CNI bridge: its IP is the one the runtime reports, and its
    container's connection to the host comes from that address."""
    rt = runtime
    assert rt.cni_subnet and not rt.cni_error, f"no pod network: {rt.cni_error}"
    pod = make_pod(rt, listener, "api-7f8b9c6d5-m4n7p", "shop",
                   {"app": "api", "pod-template-hash": "7f8b9c6d5"}, "api", host_network=False)
    ips = rt.cri.pod_ips(pod["sandbox_id"])
    assert len(ips) == 1 and ipaddress.ip_address(ips[0]) in ipaddress.ip_network(rt.cni_subnet), ips
    peers = cd.wait_for(lambda: listener.got(pod["message"]), 15, what="the pod's connection")
    assert peers == ips, f"connection came from {peers}, pod IPs {ips}"
    [line] = lookup(sockscope, rt, pod["pid"], config=config)
    check_identity(line, pod, rt, ("Deployment", "api"), ips=ips)


def test_removed_container_leaves_listing(runtime, listener, sockscope):
    """(b) A container removed is no longer listed after the next resync."""
    rt = runtime
    pod = make_pod(rt, listener, "cart-6b7c8d9f5-q8w2e", "shop",
                   {"app": "cart", "pod-template-hash": "6b7c8d9f5"}, "cart")
    sidecar = rt.cri.create_container(pod["sandbox_id"], "sidecar", rt.image, ["sleep", "3600"])
    f = Follow(pods_cmd(sockscope, rt.endpoint, "--follow", "--interval", "1s", "--count", "12"))
    try:
        records, status = f.round()
        ids = [r["container_id"] for r in records]
        assert pod["container_id"] in ids and sidecar in ids, f.context()
        assert status["connected"] is True, f.context()
        assert status["runtime"] == rt.runtime_name(), f.context()
        assert status["containers"] == len(records), f.context()
        assert status["pods"] == len(rt.cri.list_pod_sandbox().items), f.context()
        rt.cri.stop_container(sidecar)
        rt.cri.remove_container(sidecar)
        gone_at = None
        for n in range(1, 6):
            records, status = f.round()
            ids = [r["container_id"] for r in records]
            if sidecar not in ids:
                gone_at = n
                break
        assert gone_at is not None, f"removed container {sidecar} still listed 5 rounds later\n{f.context()}"
        records, status = f.round()
        ids = [r["container_id"] for r in records]
        assert sidecar not in ids and pod["container_id"] in ids, f.context()
        assert status["containers"] == len(records), f.context()
    finally:
        f.close()


def test_unreachable_endpoint(runtime, sockscope, tmp_path):
    """A runtime socket that does not exist: exit code 3 naming the endpoint,
    but --follow keeps running and reports it disconnected."""
    endpoint = f"unix://{tmp_path}/no-runtime.sock"
    rc, lines, err, _ = run_pods(sockscope, endpoint)
    assert rc == 3, f"exit {rc}, stdout {lines}, stderr {err!r}"
    assert str(tmp_path / "no-runtime.sock") in err, f"stderr does not name the endpoint: {err!r}"
    rc, lines, err, _ = run_pods(sockscope, endpoint, "--follow", "--interval", "1s", "--count", "2",
                                 "--pid", os.getpid())
    assert rc == 0, f"--follow against a missing runtime exited {rc}; stderr {err!r}"
    statuses = [ln["status"] for ln in lines if "status" in ln]
    assert len(statuses) == 2 and all(s["connected"] is False for s in statuses), lines
    assert all(s["last_error"] for s in statuses), lines


def test_frozen_runtime_bounded(runtime, listener, sockscope, config):
    """(d) containerd stopped with SIGSTOP: lookups still come back quickly, as failures."""
    rt = runtime
    pod = make_pod(rt, listener, "worker-5c6d7e8f9-z9y8x", "jobs",
                   {"app": "worker", "pod-template-hash": "5c6d7e8f9"}, "worker")
    rt.pause()
    try:
        rc, lines, err, took = run_pods(sockscope, rt.endpoint, "--follow", "--interval", "1s",
                                        "--count", "1", "--pid", pod["pid"])
        assert took < FROZEN_LOOKUP_BOUND_S, f"--pid lookup against a frozen runtime took {took:.1f} s"
        assert rc == 0, f"exit {rc}; stderr {err!r}"
        records = [ln for ln in lines if "status" not in ln]
        statuses = [ln["status"] for ln in lines if "status" in ln]
        assert [r["pid"] for r in records] == [pod["pid"]], lines
        assert records[0]["pod"] is None, f"pod resolved from a frozen runtime? {lines}"
        assert records[0]["container_id"] in (None, pod["container_id"]), lines
        assert len(statuses) == 1, lines
        st = statuses[0]
        assert st["lookup_failures"] >= 1 and st["lookups"] >= st["lookup_failures"], st
        assert st["connected"] is False and st["last_error"], st
        # Without --follow: bounded as well (it may count as unreachable).
        rc, lines, err, took = run_pods(sockscope, rt.endpoint, "--pid", pod["pid"])
        assert took < FROZEN_LOOKUP_BOUND_S, f"one-shot lookup against a frozen runtime took {took:.1f} s"
        assert rc in (0, 3), f"exit {rc}; stdout {lines}; stderr {err!r}"
        if rc == 0:
            assert [ln["pid"] for ln in lines] == [pod["pid"]] and lines[0]["pod"] is None, lines
    finally:
        rt.resume()
    [line] = lookup(sockscope, rt, pod["pid"], config=config)
    check_identity(line, pod, rt, ("Deployment", "worker"))


def test_runtime_restart(runtime, listener, sockscope, config):
    """(c) containerd stopped: disconnected, lookups fail and are counted, the
    command keeps running; started again: pods resolve, including a container
    created after the restart."""
    rt = runtime
    before = make_pod(rt, listener, "queue-0", "shop",
                      {"app": "queue", "controller-revision-hash": "queue-84c7d5f6b9",
                       "statefulset.kubernetes.io/pod-name": "queue-0"}, "queue")
    rt.stop()
    assert Path(f"/proc/{before['pid']}").exists(), "the container should outlive containerd"
    f = Follow(pods_cmd(sockscope, rt.endpoint, "-c", config, "--follow", "--interval", "1s",
                        "--count", "40", "--pid", before["pid"]))
    try:
        failures = []
        for _ in range(2):
            records, status = f.round()
            assert [r["pid"] for r in records] == [before["pid"]], f.context()
            assert records[0]["pod"] is None, f.context()
            assert status["connected"] is False, f.context()
            assert status["last_error"], f.context()
            assert status["lookups"] >= status["lookup_failures"] >= 1, f.context()
            failures.append(status["lookup_failures"])
        assert failures[1] >= failures[0], f"lookup_failures went down: {failures}\n{f.context()}"
        # Not following: the endpoint cannot be reached at all.
        rc, lines, err, _ = run_pods(sockscope, rt.endpoint)
        # (That the message names the endpoint is test_unreachable_endpoint's.)
        assert rc == 3, f"exit {rc}, stdout {lines}, stderr {err!r}"
        assert f.proc.poll() is None, f"--follow stopped while the runtime was away\n{f.context()}"

        rt.start()
        after = make_pod(rt, listener, "queue-1", "shop",
                         {"app": "queue", "controller-revision-hash": "queue-84c7d5f6b9",
                          "statefulset.kubernetes.io/pod-name": "queue-1"}, "queue")
        resolved = None
        for _ in range(10):
            records, status = f.round()
            if status["connected"] and records and records[0]["pod"] is not None:
                resolved = records[0]
                break
        assert resolved is not None, f"no reconnection within 10 rounds\n{f.context()}"
        check_identity(resolved, before, rt, ("StatefulSet", "queue"))
        assert status["runtime"] == rt.runtime_name(), f.context()
        [line] = lookup(sockscope, rt, after["pid"], config=config)
        check_identity(line, after, rt, ("StatefulSet", "queue"))
        assert f.proc.poll() is None, f.context()
    finally:
        f.close()


def test_replayed_runtime_lists_recorded_pods(sockscope, tmp_path):
    """The recorded answers served by replay_server.py: sockscope lists every
    recorded container with its pod and the pod's recorded IPs."""
    import replay_server

    fixture = replay_server.DEFAULT_FIXTURE
    assert fixture.exists(), f"{fixture} missing: run tests/cri/record.py"
    rec = json.loads(fixture.read_text())
    sock = tmp_path / "replay.sock"
    server = subprocess.Popen([sys.executable, str(Path(replay_server.__file__)), "--fixture",
                               str(fixture), "--unix", str(sock)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().startswith("listening"), server.stderr.read()
        rc, lines, err, _ = run_pods(sockscope, f"unix://{sock}")
        assert rc == 0, err
        sandboxes = {s["id"]: s for s in rec["list_pod_sandbox"]["items"]}
        want = {}
        for c in rec["list_containers"]["containers"]:
            sb = sandboxes[c["pod_sandbox_id"]]
            net = rec["pod_sandbox_status"][sb["id"]]["status"].get("network", {})
            ips = [ip for ip in [net.get("ip", ""), *(a["ip"] for a in net.get("additional_ips", []))] if ip]
            want[c["id"]] = (sb["metadata"]["name"], sb["metadata"]["namespace"],
                             c["metadata"]["name"], ips)
        got = {ln["container_id"]: (ln["pod"]["name"], ln["pod"]["namespace"],
                                    ln["pod"]["container_name"], ln["pod"]["ips"])
               for ln in lines if ln.get("pod")}
        assert got == want, "\n".join(map(json.dumps, lines))
    finally:
        server.terminate()
        server.wait(10)
