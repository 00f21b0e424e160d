"""pytest fixtures of the CRI test bed.

``runtime`` is one private containerd for the whole module (started once,
about a second); before each test it is made to run again if a test left it
stopped or paused.  ``sockscope`` is the daemon's binary (``$SOCKSCOPE_BIN``
or ``target/release/sockscope``).  ``listener`` is a TCP server on the host
that the test containers connect to.  A failing test gets the tail of the
containerd log attached to its report.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import containerd as cd  # noqa: E402

_RUNTIMES: list = []


@pytest.fixture(scope="module")
def runtime_module():
    # Missing containerd/runc/busybox raise here: the tests error, never skip.
    rt = cd.PrivateContainerd()
    _RUNTIMES.append(rt)
    try:
        rt.start()
        yield rt
    finally:
        rt.close()
        _RUNTIMES.remove(rt)


@pytest.fixture
def runtime(runtime_module):
    rt = runtime_module
    rt.resume()
    rt.start()
    return rt


@pytest.fixture(scope="session")
def sockscope():
    path = Path(os.environ.get("SOCKSCOPE_BIN") or cd.REPO / "target/release/sockscope")
    if not os.access(path, os.X_OK):
        pytest.fail(f"sockscope binary {path} does not exist or is not executable "
                    "(build it, or set SOCKSCOPE_BIN)", pytrace=False)
    return path


class Listener:
    """Accepts TCP connections on all addresses; keeps each peer's first line."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        #: (peer address, first line)
        self.received: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn, peer):
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while b"\n" not in data and len(data) < 1024:
                    chunk = conn.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(b"ok\n")
            except OSError:
                pass
        with self.lock:
            self.received.append((peer[0], data.decode(errors="replace").strip()))

    def got(self, message: str):
        """The peer addresses that sent ``message``."""
        with self.lock:
            return [peer for peer, m in self.received if m == message]

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def listener():
    lst = Listener()
    yield lst
    lst.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _RUNTIMES:
        for rt in _RUNTIMES:
            report.sections.append((f"containerd log tail ({rt.log_path})", rt.log_tail(30)))
