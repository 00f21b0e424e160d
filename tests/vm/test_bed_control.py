"""The guest control channel itself, on every kernel: exit codes, stderr,
timeouts, binary-safe transfer, background processes and signals."""

from __future__ import annotations

import os

import pytest

import bed

#: Size of the binary round-trip payload (crosses several base64 lines and socket reads).
BLOB_BYTES = 300_000


def test_run_reports_exit_code_stdout_and_stderr(vm):
    r = vm.run("echo out; echo err >&2; exit 7")
    assert (r.rc, r.out, r.err) == (7, "out\n", "err\n")
    with pytest.raises(bed.BedError, match="rc=7"):
        vm.run("exit 7", check=True)


def test_run_timeout_kills_the_command(vm):
    r = vm.run("sleep 30; echo not reached", timeout=2)
    assert r.rc == 137 and "not reached" not in r.out


def test_put_and_fetch_are_binary_safe(vm):
    blob = os.urandom(BLOB_BYTES)
    vm.put("/tmp/blob.bin", blob)
    assert vm.run("stat -c %s /tmp/blob.bin", check=True).out.strip() == str(BLOB_BYTES)
    assert vm.fetch("/tmp/blob.bin") == blob
    with pytest.raises(bed.BedError, match="cannot fetch"):
        vm.fetch("/nonexistent/file")


def test_spawn_runs_in_background_and_reports_signal_exit(vm):
    p = vm.spawn("echo started; exec sleep 600")
    assert p.alive()
    assert vm.run(f"kill -0 {p.pid}").rc == 0
    assert p.stop("TERM") == 128 + 15
    assert "started" in p.log()
    q = vm.spawn("exit 3")
    assert q.wait(20) == 3


def test_start_daemon_fails_loudly_when_the_daemon_exits(vm):
    # A stand-in daemon that exits at once must be reported with its log, not waited on.
    vm.put("/tmp/fake-daemon", b"#!/bin/sh\necho fake daemon starting: $*\nexit 3\n", mode=0o755)
    orig = bed.GUEST_DAEMON
    bed.GUEST_DAEMON = "/tmp/fake-daemon"
    with_daemon, vm.with_daemon = vm.with_daemon, True
    try:
        with pytest.raises(bed.BedError, match=r"daemon exited with 3[\s\S]*fake daemon starting: serve"):
            vm.start_daemon(timeout=30)
    finally:
        bed.GUEST_DAEMON = orig
        vm.with_daemon = with_daemon
        vm.daemon = None
