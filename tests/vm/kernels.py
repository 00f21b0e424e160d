"""Fetch and unpack Debian cloud kernels for the VM test bed.

A private apt configuration (own sources, state and cache directories) lives
under the kernel cache, so nothing on the host's apt setup is touched or
needed.  ``fetch(suite)`` resolves ``linux-image-cloud-amd64/<suite>`` to the
concrete image package (and, for split packages, ``linux-binary-*`` and
``linux-modules-*``), downloads them with ``apt-get download``, unpacks them
with ``dpkg-deb -x`` and returns a :class:`Kernel`.  Unpacked kernels are
keyed by suite and package version; when the archive cannot be reached the
last unpacked kernel of the suite is reused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

#: Suites the bed knows, in age order, with the Debian release they track.
SUITES = ("bullseye", "bookworm", "trixie", "sid")
#: Default kernel cache, outside the repository.
DEFAULT_CACHE = "/var/cache/sockscope-kernels"
#: Archive mirror used by the private apt configuration.
MIRROR = "http://deb.debian.org/debian"
#: Keyring that verifies all four suites' Release files.
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: Package lists younger than this are not refreshed.
LISTS_MAX_AGE_S = 6 * 3600
#: Upper bound for one apt-get invocation.
APT_TIMEOUT_S = 900
#: Meta package that points to the current cloud kernel of a suite.
META_PACKAGE = "linux-image-cloud-amd64"


class KernelFetchError(RuntimeError):
    """A kernel could not be resolved, downloaded or unpacked."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An unpacked Debian cloud kernel."""

    suite: str
    version: str  # Debian package version, e.g. 6.1.176-1
    release: str  # kernel release (uname -r), e.g. 6.1.0-50-cloud-amd64
    vmlinuz: Path
    modules: Path  # .../lib/modules/<release>

    def to_json(self) -> dict:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}

    @staticmethod
    def from_json(d: dict) -> "Kernel":
        return Kernel(d["suite"], d["version"], d["release"], Path(d["vmlinuz"]), Path(d["modules"]))


def cache_dir() -> Path:
    """The kernel cache directory (``SOCKSCOPE_KERNEL_CACHE`` or the default)."""
    return Path(os.environ.get("SOCKSCOPE_KERNEL_CACHE", DEFAULT_CACHE))


def _log(msg: str) -> None:
    print(f"[kernels] {msg}", file=sys.stderr, flush=True)


class AptEnv:
    """A private apt configuration rooted at ``<cache>/apt``."""

    def __init__(self, root: Path, trusted_suites: frozenset[str] = frozenset()):
        self.root = root
        self.conf = root / "apt.conf"
        self.trusted_suites = trusted_suites

    def write(self) -> None:
        for sub in ("etc/apt.conf.d", "etc/preferences.d", "etc/trusted.gpg.d",
                    "state/lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        status = self.root / "state/status"
        if not status.exists():
            status.write_text("")
        lines = []
        for suite in SUITES:
            opt = "trusted=yes" if suite in self.trusted_suites else f"signed-by={KEYRING}"
            lines.append(f"deb [arch=amd64 {opt}] {MIRROR} {suite} main\n")
        (self.root / "etc/sources.list").write_text("".join(lines))
        r = self.root
        self.conf.write_text(
            f'Dir::Etc "{r}/etc";\n'
            f'Dir::Etc::SourceList "{r}/etc/sources.list";\n'
            f'Dir::Etc::SourceParts "{r}/etc/sources.list.d";\n'
            f'Dir::Etc::Parts "{r}/etc/apt.conf.d";\n'
            f'Dir::Etc::PreferencesParts "{r}/etc/preferences.d";\n'
            f'Dir::Etc::TrustedParts "{r}/etc/trusted.gpg.d";\n'
            f'Dir::State "{r}/state";\n'
            f'Dir::State::status "{r}/state/status";\n'
            f'Dir::Cache "{r}/cache";\n'
            'APT::Architecture "amd64";\n'
            'APT::Architectures { "amd64"; };\n'
            'APT::Sandbox::User "root";\n'
            'Acquire::Languages "none";\n'
            'Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";\n'
            'Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled "false";\n'
            'Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled "false";\n'
            'Acquire::Retries "3";\n'
            # The archive may be served from a frozen mirror whose Release
            # files are past their Valid-Until date; signatures still apply.
            'Acquire::Check-Valid-Until "false";\n'
            'Acquire::Check-Date "false";\n'
        )

    def run(self, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, APT_CONFIG=str(self.conf), LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
        try:
            return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True,
                                  timeout=APT_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise KernelFetchError(f"{' '.join(args)} timed out after {APT_TIMEOUT_S}s") from e

    def update(self) -> None:
        """``apt-get update``; suites whose signature cannot be checked are retried as trusted."""
        self.write()
        r = self.run(["apt-get", "update"])
        bad = {s for s in SUITES
               if re.search(rf"\b{s}\b.*(NO_PUBKEY|not signed|EXPKEYSIG|invalid signature)", r.stdout + r.stderr)}
        if bad and not bad <= self.trusted_suites:
            _log(f"WARNING: cannot verify Release signature of {sorted(bad)} with {KEYRING}; "
                 "retrying those suites with trusted=yes")
            self.trusted_suites = frozenset(self.trusted_suites | bad)
            self.write()
            r = self.run(["apt-get", "update"])
        if r.returncode != 0 or re.search(r"^(W|E): Failed to fetch", r.stdout + r.stderr, re.M):
            raise KernelFetchError(f"apt-get update failed (config {self.conf}):\n{r.stdout}\n{r.stderr}")
        (self.root / "state/updated-stamp").write_text(str(time.time()))

    def lists_fresh(self) -> bool:
        stamp = self.root / "state/updated-stamp"
        try:
            return time.time() - float(stamp.read_text()) < LISTS_MAX_AGE_S and self.conf.exists()
        except (OSError, ValueError):
            return False

    def show(self, spec: str) -> dict[str, str]:
        """First stanza of ``apt-cache show SPEC`` as a dict."""
        r = self.run(["apt-cache", "show", "--no-all-versions", spec])
        if r.returncode != 0 or not r.stdout.strip():
            raise KernelFetchError(f"apt-cache show {spec} failed (config {self.conf}): {r.stderr.strip()}")
        fields: dict[str, str] = {}
        key = None
        for line in r.stdout.splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            if line[0] in " \t" and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                fields[key] = val.strip()
        return fields

    def download(self, pkg: str, version: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        for f in dest.glob(f"{pkg}_*.deb"):
            if _deb_version(f) == version:
                return f
        r = self.run(["apt-get", "download", f"{pkg}={version}"], cwd=dest)
        if r.returncode != 0:
            raise KernelFetchError(f"apt-get download {pkg}={version} failed:\n{r.stdout}\n{r.stderr}")
        for f in dest.glob(f"{pkg}_*.deb"):
            if _deb_version(f) == version:
                return f
        raise KernelFetchError(f"apt-get download {pkg}={version} produced no .deb in {dest}")


def _deb_version(path: Path) -> str:
    r = subprocess.run(["dpkg-deb", "-f", str(path), "Version"], capture_output=True, text=True)
    return r.stdout.strip()


def _depends(fields: dict[str, str]) -> list[tuple[str, str | None]]:
    """(name, exact version or None) for each first alternative in Depends."""
    out = []
    for item in fields.get("Depends", "").split(","):
        first = item.split("|")[0].strip()
        m = re.match(r"([a-z0-9][a-z0-9+.\-]*)(?:\s*\(\s*=\s*([^)\s]+)\s*\))?", first)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def resolve(apt: AptEnv, suite: str) -> tuple[str, list[tuple[str, str]]]:
    """Return (image version, [(package, version), ...] to download) for a suite."""
    meta = apt.show(f"{META_PACKAGE}/{suite}")
    image = [(n, v) for n, v in _depends(meta) if re.match(r"linux-image-\d", n)]
    if not image:
        raise KernelFetchError(f"{META_PACKAGE}/{suite} depends on no linux-image-<ver>: {meta.get('Depends')}")
    name, ver = image[0]
    if ver is None:
        ver = meta["Version"]
    img = apt.show(f"{name}={ver}")
    pkgs = [(name, ver)]
    for dep, dver in _depends(img):
        if re.match(r"linux-(binary|modules)-\d", dep):
            pkgs.append((dep, dver or ver))
    return ver, pkgs


def _find_kernel(root: Path, suite: str, version: str) -> Kernel:
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        vmlinuz = (sorted(root.glob("usr/lib/modules/*/vmlinuz")) + sorted(root.glob("lib/modules/*/vmlinuz"))
                   + sorted(root.glob("usr/lib/linux-image-*/vmlinuz*")))
    if not vmlinuz:
        raise KernelFetchError(f"no vmlinuz found under {root}")
    mods = [p for p in list((root / "lib/modules").glob("*")) + list((root / "usr/lib/modules").glob("*"))
            if p.is_dir() and (p / "kernel").is_dir() and not p.is_symlink()]
    if not mods:
        raise KernelFetchError(f"no modules directory found under {root}")
    release = mods[0].name
    return Kernel(suite, version, release, vmlinuz[0], mods[0])


def _record(cache: Path, suite: str) -> Path:
    return cache / "kernels" / f"{suite}.json"


def fetch(suite: str, *, offline: bool = False) -> Kernel:
    """Make the suite's current cloud kernel available locally and return it."""
    if suite not in SUITES:
        raise KernelFetchError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    cache = cache_dir()
    apt = AptEnv(cache / "apt")
    record = _record(cache, suite)
    offline = offline or os.environ.get("SOCKSCOPE_KERNEL_OFFLINE") == "1"
    try:
        if offline:
            raise KernelFetchError("offline mode requested")
        if not apt.lists_fresh():
            _log(f"apt-get update (config {apt.conf})")
            apt.update()
        version, pkgs = resolve(apt, suite)
    except KernelFetchError as e:
        if record.exists():
            k = Kernel.from_json(json.loads(record.read_text()))
            if k.vmlinuz.exists() and k.modules.is_dir():
                _log(f"{suite}: archive unavailable ({str(e).splitlines()[0]}); reusing cached {k.version}")
                return k
        raise
    target = cache / "kernels" / f"{suite}-{version}"
    done = target / ".complete"
    if done.exists():
        k = Kernel.from_json(json.loads(done.read_text()))
        record.write_text(done.read_text())
        return k
    debs = cache / "debs"
    _log(f"{suite}: downloading {', '.join(f'{p}={v}' for p, v in pkgs)}")
    files = [apt.download(p, v, debs) for p, v in pkgs]
    tmp = target.with_name(target.name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    tmp.mkdir(parents=True)
    for f in files:
        r = subprocess.run(["dpkg-deb", "-x", str(f), str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            raise KernelFetchError(f"dpkg-deb -x {f} failed: {r.stderr}")
    subprocess.run(["rm", "-rf", str(target)], check=True)
    tmp.rename(target)
    k = _find_kernel(target, suite, version)
    data = json.dumps(k.to_json(), indent=1)
    done.write_text(data)
    record.write_text(data)
    _log(f"{suite}: kernel {k.release} ready at {target}")
    return k


def selected_suites() -> list[str]:
    """Suites named by ``SOCKSCOPE_KERNELS`` (comma separated), default all four."""
    raw = os.environ.get("SOCKSCOPE_KERNELS", "").strip()
    if not raw or raw == "all":
        return list(SUITES)
    names = [s.strip() for s in raw.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise KernelFetchError(f"SOCKSCOPE_KERNELS names unknown suites {unknown}; known: {', '.join(SUITES)}")
    return names


if __name__ == "__main__":
    for s in sys.argv[1:] or SUITES:
        print(json.dumps(fetch(s).to_json()))
