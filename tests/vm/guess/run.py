#!/usr/bin/env python3
"""Boots each Debian kernel with the guess comparison tool and checks it.

    CARGO_TARGET_DIR=../../../target cargo build     # from this directory
    ./run.py [bullseye bookworm trixie sid]           # default: all four

Kernels come from the kernel cache written by tests/vm/kernels.py
(/var/cache/sockscope-kernels/kernels/<suite>.json). Each guest runs
`guesscmp` as init's only job and powers off; the console log is kept in
$WORK/<suite>.log. Fails (exit 1) unless, on every kernel, every guessed
offset equals the BTF one in forced-guess mode and with BTF hidden in auto
mode, no guess probe/instance/address is left behind, the probe set built
from guessed offsets installs, and socket.offsets=btf fails with BTF hidden.
Prints a timing table (setup with BTF vs with guessing).
"""
import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
BIN = os.environ.get("BIN", os.path.join(ROOT, "target", "debug", "guesscmp"))
WORK = os.environ.get("WORK", "/tmp/guess-vm")
CACHE = "/var/cache/sockscope-kernels/kernels"
SUITES = ["bullseye", "bookworm", "trixie", "sid"]
BOOT_TIMEOUT_S = 900

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tracefs nodev /sys/kernel/tracing
mount -t tmpfs tmp /tmp
ip link set lo up
RUST_BACKTRACE=1 /bin/guesscmp
echo "@@EXIT $?"
poweroff -f
"""


def initrd():
    """Builds $WORK/initrd.gz with busybox, the tool and its libraries."""
    root = os.path.join(WORK, "rootfs")
    shutil.rmtree(root, ignore_errors=True)
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"]:
        os.makedirs(os.path.join(root, d))
    shutil.copy("/bin/busybox", os.path.join(root, "bin", "busybox"))
    for a in ["sh", "mount", "ip", "poweroff", "cat"]:
        os.symlink("busybox", os.path.join(root, "bin", a))
    shutil.copy(BIN, os.path.join(root, "bin", "guesscmp"))
    ldd = subprocess.run(["ldd", BIN], capture_output=True, text=True, check=True).stdout
    for lib in re.findall(r"(/\S+)", ldd):
        dst = root + lib
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(lib, dst)
    with open(os.path.join(root, "init"), "w") as f:
        f.write(INIT)
    os.chmod(os.path.join(root, "init"), 0o755)
    out = os.path.join(WORK, "initrd.gz")
    subprocess.run(
        f"cd {root} && find . | cpio -H newc -o 2>/dev/null | gzip -1 > {out}",
        shell=True, check=True)
    return out


def boot(suite, rd):
    with open(os.path.join(CACHE, suite + ".json")) as f:
        k = json.load(f)
    log = os.path.join(WORK, suite + ".log")
    with open(log, "w") as out:
        subprocess.run(
            ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "2",
             "-m", "1024", "-nographic", "-no-reboot", "-kernel", k["vmlinuz"],
             "-initrd", rd, "-append", "console=ttyS0 panic=-1 quiet"],
            stdout=out, stderr=subprocess.STDOUT, timeout=BOOT_TIMEOUT_S, check=False)
    with open(log, errors="replace") as f:
        return f.read().replace("\r", "")


def verdict(suite, text):
    """(ok, problems, timings) from one console log."""
    problems = []
    if "@@DONE" not in text:
        problems.append("tool did not finish")
    for label in ["forced", "auto", "mapped", "noraw"]:
        m = re.search(rf"@@COMPARED {label} fields=(\d+) diffs=(\d+)", text)
        if not m:
            problems.append(f"no {label} comparison")
        elif m.group(2) != "0":
            problems.append(f"{label}: {m.group(2)} fields differ")
    for l in re.findall(r"@@FIELD \S+ .* DIFF", text):
        problems.append(l)
    if not re.search(r"@@LEFTOVERS probes=false instance=false ula_on_lo=0", text):
        problems.append("guess leftovers: " + str(re.findall(r"@@LEFTOVERS.*", text)))
    if not re.search(r"@@INSTALL_GUESSED ok", text):
        problems.append("probe set from guessed offsets not installed")
    if not re.search(r"@@AUTO guess why=.*BTF unusable", text):
        problems.append("auto mode with hidden BTF did not guess: " + str(re.findall(r"@@AUTO.*", text)))
    if not re.search(r"@@BTF_MODE_HIDDEN error", text):
        problems.append("btf mode with hidden BTF did not fail")
    t = dict(re.findall(r"@@TIME (\w+)=([\d.]+)", text))
    return not problems, problems, t


def main():
    suites = sys.argv[1:] or SUITES
    os.makedirs(WORK, exist_ok=True)
    rd = initrd()
    ok_all = True
    rows = []
    for s in suites:
        text = boot(s, rd)
        ok, problems, t = verdict(s, text)
        kernel = (re.findall(r"@@KERNEL (\S+)", text) or ["?"])[0]
        reps = re.findall(r"@@REPORT (\S+) reps=(\d+) ms=([\d.]+)", text)
        print(f"== {s} {kernel}: {'PASS' if ok else 'FAIL'}")
        for p in problems:
            print("   ", p)
        for name, n, ms in reps:
            print(f"    guess {name:<18} {n:>2} reps {float(ms):8.1f} ms")
        rows.append((s, kernel, t.get("btf_setup_ms", "?"), t.get("guess_setup_ms", "?"),
                     t.get("auto_hidden_setup_ms", "?")))
        ok_all &= ok
    print("| suite | kernel | setup with BTF (ms) | setup guessing (ms) | auto, BTF hidden (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
