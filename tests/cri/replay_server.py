#!/usr/bin/env python3
"""Serves a containerd's recorded CRI answers (``record.py``) over gRPC.

    replay_server.py [--fixture tests/fixtures/cri/recorded.json] (--unix PATH | --tcp HOST:PORT)

Implements the read calls of ``runtime.v1.RuntimeService`` the daemon makes
-- ``Version``, ``ListPodSandbox``, ``ListContainers``, ``PodSandboxStatus``
-- from the fixture; every other call answers UNIMPLEMENTED.  Filters behave
as containerd 1.6's: an id or sandbox id may be a unique prefix of the full
id (an unknown or ambiguous one matches nothing), state and label selectors
are ANDed, and ``PodSandboxStatus`` of an unknown id is NOT_FOUND with
containerd's message.  Prints ``listening on <address>`` once it serves
(``--tcp HOST:0`` picks a port and prints it); stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import json_format

sys.path.insert(0, str(Path(__file__).resolve().parent))

from containerd import REPO, pb2, pb2_grpc  # noqa: E402

DEFAULT_FIXTURE = REPO / "tests" / "fixtures" / "cri" / "recorded.json"


def _resolve(prefix: str, ids: list[str]) -> str | None:
    """containerd's truncindex: the one id starting with ``prefix``, else None."""
    matches = [i for i in ids if i.startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


def _labels_match(selector, labels) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class Recorded:
    """The fixture's answers as messages."""

    def __init__(self, path: Path):
        data = json.loads(Path(path).read_text())
        self.version = json_format.ParseDict(data["version"], pb2.VersionResponse())
        self.sandboxes = json_format.ParseDict(data["list_pod_sandbox"],
                                               pb2.ListPodSandboxResponse()).items
        self.containers = json_format.ParseDict(data["list_containers"],
                                                pb2.ListContainersResponse()).containers
        self.status = {sid: json_format.ParseDict(answer, pb2.PodSandboxStatusResponse())
                       for sid, answer in data["pod_sandbox_status"].items()}


class ReplayRuntime(pb2_grpc.RuntimeServiceServicer):
    def __init__(self, recorded: Recorded):
        self.rec = recorded

    def Version(self, request, context):
        return self.rec.version

    def ListPodSandbox(self, request, context):
        items = list(self.rec.sandboxes)
        f = request.filter
        if request.HasField("filter"):
            if f.id:
                sid = _resolve(f.id, [s.id for s in items])
                items = [s for s in items if s.id == sid]
            if f.HasField("state"):
                items = [s for s in items if s.state == f.state.state]
            if f.label_selector:
                items = [s for s in items if _labels_match(f.label_selector, s.labels)]
        return pb2.ListPodSandboxResponse(items=items)

    def ListContainers(self, request, context):
        items = list(self.rec.containers)
        f = request.filter
        if request.HasField("filter"):
            if f.id:
                cid = _resolve(f.id, [c.id for c in items])
                items = [c for c in items if c.id == cid]
            if f.pod_sandbox_id:
                sid = _resolve(f.pod_sandbox_id, [s.id for s in self.rec.sandboxes])
                items = [c for c in items if c.pod_sandbox_id == sid]
            if f.HasField("state"):
                items = [c for c in items if c.state == f.state.state]
            if f.label_selector:
                items = [c for c in items if _labels_match(f.label_selector, c.labels)]
        return pb2.ListContainersResponse(containers=items)

    def PodSandboxStatus(self, request, context):
        ids = list(self.rec.status)
        if not request.pod_sandbox_id:
            context.abort(grpc.StatusCode.UNKNOWN,
                          "an error occurred when try to find sandbox: Prefix can't be empty")
        matches = [i for i in ids if i.startswith(request.pod_sandbox_id)]
        if len(matches) > 1:
            context.abort(grpc.StatusCode.UNKNOWN,
                          "an error occurred when try to find sandbox: "
                          f"Multiple IDs found with provided prefix: {request.pod_sandbox_id}")
        if not matches:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          "an error occurred when try to find sandbox: not found")
        return self.rec.status[matches[0]]


def serve(fixture: Path, unix: str | None = None, tcp: str | None = None):
    """Start the server; returns (server, address it listens on)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb2_grpc.add_RuntimeServiceServicer_to_server(ReplayRuntime(Recorded(fixture)), server)
    if unix:
        Path(unix).unlink(missing_ok=True)
        server.add_insecure_port(f"unix://{unix}")
        address = f"unix://{unix}"
    else:
        host, _, port = tcp.rpartition(":")
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise SystemExit(f"cannot listen on {tcp}")
        address = f"{host}:{bound}"
    server.start()
    return server, address


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--tcp", metavar="HOST:PORT", help="listen on this TCP address")
    args = ap.parse_args(argv)
    server, address = serve(args.fixture, args.unix, args.tcp)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"listening on {address}", flush=True)
    done.wait()
    server.stop(1).wait()
    if args.unix:
        Path(args.unix).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
