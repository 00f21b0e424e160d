"""Fetch and unpack Debian cloud kernels for the VM test bed.

A private apt configuration (own sources, state and cache directories) lives
under the kernel cache, so nothing of the host's apt setup is changed.  The
archive it uses is the one the machine's own apt sources name (read as
apt-get reads them: ``sources.list``, ``sources.list.d/*.list`` and deb822
``*.sources``; an entry serving a Debian release suite with component
``main``); without one the fetch fails.  Every suite's Release file is
verified: with the installed ``debian-archive-keyring``, or, for suites
signed by keys newer than it, with the keyring of a newer
``debian-archive-keyring`` package downloaded through a suite the installed
keyring does verify (so the newer keys are trusted through a verified
Release, Packages and package hash).  When no such chain exists the fetch
fails; nothing is ever used unverified.

``fetch(suite)`` resolves ``linux-image-cloud-amd64/<suite>`` to the
concrete image package (and, for split packages, ``linux-binary-*`` and
``linux-modules-*``), downloads them with ``apt-get download``, unpacks them
with ``dpkg-deb -x`` and returns a :class:`Kernel`.  Unpacked kernels are
keyed by suite and package version; when the archive cannot be reached the
last unpacked kernel of the suite is reused (never when it is reachable but
unverified, or when no archive is configured).
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
#: The installed Debian archive keyring: the root of trust.
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: Package whose newer versions carry the keys of newer releases.
KEYRING_PACKAGE = "debian-archive-keyring"
#: Where that package keeps its keyring (older versions: .gpg, newer: .pgp).
KEYRING_MEMBERS = ("usr/share/keyrings/debian-archive-keyring.pgp",
                   "usr/share/keyrings/debian-archive-keyring.gpg")
#: Suite names an entry of the machine's sources may serve for it to count
#: as the Debian archive (besides SUITES and the host's own codename).
ARCHIVE_SUITE_ALIASES = ("oldoldstable", "oldstable", "stable", "testing", "unstable")
#: URI schemes apt can fetch from that the private configuration accepts.
URI_SCHEMES = ("http://", "https://", "file:", "mirror+http://", "mirror+https://", "mirror+file:")
#: apt messages that mean a Release file's signature was not accepted.
SIGNATURE_ERRORS = re.compile(r"NO_PUBKEY|EXPKEYSIG|KEYEXPIRED|REVKEYSIG|BADSIG|ERRSIG|GPG error|is not signed|"
                              r"signatures? (?:was|were) invalid|couldn't be verified|not signed")
#: Package lists younger than this are not refreshed.
LISTS_MAX_AGE_S = 6 * 3600
#: Upper bound for one apt-get invocation.
APT_TIMEOUT_S = 900
#: Meta package that points to the current cloud kernel of a suite.
META_PACKAGE = "linux-image-cloud-amd64"


class KernelFetchError(RuntimeError):
    """A kernel could not be resolved, downloaded or unpacked."""


class ArchiveTrustError(KernelFetchError):
    """No archive is configured, or a suite's Release cannot be verified: never
    answered with a cached kernel, always an error."""


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


def _os_codename() -> str | None:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.partition("=")[2].strip().strip('"') or None
    except OSError:
        pass
    return None


def source_files() -> list[Path]:
    """The machine's apt source files, where apt-get looks for them."""
    main, parts = Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d")
    try:
        r = subprocess.run(["apt-config", "shell", "SL", "Dir::Etc::sourcelist/f", "SP", "Dir::Etc::sourceparts/d"],
                           capture_output=True, text=True, timeout=30)
        conf = dict(re.findall(r"^(SL|SP)='(.*)'$", r.stdout, re.M))
        main, parts = Path(conf.get("SL", main)), Path(conf.get("SP", parts))
    except (OSError, subprocess.SubprocessError):
        pass
    files = [main] if main.is_file() else []
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.is_file() and p.suffix in (".list", ".sources"))
    return files


def parse_sources(path: Path, text: str) -> list[tuple[str, str, list[str], list[str]]]:
    """(type, uri, suites, components) of every enabled entry of one source file."""
    entries = []
    if path.suffix == ".sources":
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            key = None
            for line in stanza.splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                if line[0] in " \t" and key:
                    fields[key] += " " + line.strip()
                elif ":" in line:
                    key, _, val = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = val.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            for typ in fields.get("types", "").split():
                for uri in fields.get("uris", "").split():
                    entries.append((typ, uri, fields.get("suites", "").split(), fields.get("components", "").split()))
    else:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            line = re.sub(r"\[[^\]]*\]", " ", line)  # options
            parts = line.split()
            if len(parts) >= 3:
                entries.append((parts[0], parts[1], [parts[2]], parts[3:]))
    return entries


def archive_uris() -> list[str]:
    """URIs of the Debian archive in the machine's apt sources; fails when there is none."""
    names = set(SUITES) | set(ARCHIVE_SUITE_ALIASES) | ({_os_codename()} - {None})
    files = source_files()
    uris: list[str] = []
    for f in files:
        try:
            text = f.read_text()
        except OSError as e:
            raise ArchiveTrustError(f"cannot read apt source file {f}: {e}") from e
        for typ, uri, suites, components in parse_sources(f, text):
            if (typ == "deb" and "main" in components and names & set(suites)
                    and uri.startswith(URI_SCHEMES) and uri.rstrip("/") not in uris):
                uris.append(uri.rstrip("/"))
    if not uris:
        raise ArchiveTrustError("no Debian archive in the machine's apt sources (read: "
                                f"{', '.join(map(str, files)) or 'no source files'}): the kernel bed needs an "
                                "enabled `deb` entry with component main for a Debian release suite")
    return uris


class AptEnv:
    """A private apt configuration rooted at ``<cache>/apt``.

    ``keyrings`` maps each suite to the keyring its Release must verify
    with (the installed one unless a chain of trust gave a newer one);
    it is kept in ``keyrings.json`` with the lists it verified.
    """

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "apt.conf"
        self.keyrings_file = root / "keyrings.json"
        try:
            self.keyrings: dict[str, str] = json.loads(self.keyrings_file.read_text())
        except (OSError, ValueError):
            self.keyrings = {}

    def write(self, uris: list[str]) -> None:
        for sub in ("etc/apt.conf.d", "etc/preferences.d", "etc/trusted.gpg.d", "etc/sources.list.d",
                    "state/lists/partial", "cache/archives/partial", "keyrings"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        status = self.root / "state/status"
        if not status.exists():
            status.write_text("")
        lines = [f"deb [arch=amd64 signed-by={self.keyrings.get(suite, KEYRING)}] {uri} {suite} main\n"
                 for uri in uris for suite in SUITES]
        (self.root / "etc/sources.list").write_text("".join(lines))
        self.keyrings_file.write_text(json.dumps(self.keyrings, indent=1))
        r = self.root
        self.conf.write_text(
            f'Dir::Etc "{r}/etc";\n'
            f'Dir::Etc::SourceList "{r}/etc/sources.list";\n'
            f'Dir::Etc::SourceParts "{r}/etc/sources.list.d";\n'
            f'Dir::Etc::Parts "{r}/etc/apt.conf.d";\n'
            f'Dir::Etc::PreferencesParts "{r}/etc/preferences.d";\n'
            f'Dir::Etc::TrustedParts "{r}/etc/trusted.gpg.d";\n'
            f'Dir::Etc::Trusted "{r}/etc/trusted.gpg";\n'
            f'Dir::State "{r}/state";\n'
            f'Dir::State::status "{r}/state/status";\n'
            f'Dir::Cache "{r}/cache";\n'
            'APT::Architecture "amd64";\n'
            'APT::Architectures { "amd64"; };\n'
            'APT::Sandbox::User "root";\n'
            'APT::Get::AllowUnauthenticated "false";\n'
            'Acquire::AllowInsecureRepositories "false";\n'
            'Acquire::AllowDowngradeToInsecureRepositories "false";\n'
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

    def _apt_update(self, uris: list[str]) -> dict[str, str]:
        """``apt-get update``; returns suite -> apt's message for suites whose Release was not verified."""
        self.write(uris)
        r = self.run(["apt-get", "update"])
        out = r.stdout + r.stderr
        unverified = {}
        for suite in SUITES:
            lines = [ln for ln in out.splitlines() if re.search(rf" {re.escape(suite)} (In)?Release\b", ln)
                     and SIGNATURE_ERRORS.search(ln)]
            if lines:
                unverified[suite] = lines[0].strip()
        failed = [ln for ln in out.splitlines()
                  if re.match(r"(W|E): ", ln) and not SIGNATURE_ERRORS.search(ln)
                  and not any(f" {s} " in ln for s in unverified)]
        if (r.returncode != 0 and not unverified) or any("Failed to fetch" in ln for ln in failed):
            raise KernelFetchError(f"apt-get update failed (config {self.conf}):\n{r.stdout}\n{r.stderr}")
        return unverified

    def _keyring_from(self, suite: str) -> str:
        """The keyring of ``debian-archive-keyring`` as ``suite`` (verified) carries it."""
        fields = self.show(f"{KEYRING_PACKAGE}/{suite}")
        deb = self.download(KEYRING_PACKAGE, fields["Version"], self.root / "keyrings")
        dest = self.root / "keyrings" / f"{KEYRING_PACKAGE}_{fields['Version']}"
        subprocess.run(["rm", "-rf", str(dest)], check=True)
        r = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
        if r.returncode != 0:
            raise ArchiveTrustError(f"dpkg-deb -x {deb} failed: {r.stderr}")
        for member in KEYRING_MEMBERS:
            if (dest / member).is_file():
                return str(dest / member)
        raise ArchiveTrustError(f"{deb} carries none of {', '.join(KEYRING_MEMBERS)}")

    def update(self) -> None:
        """``apt-get update`` with every suite's Release verified.

        Suites the installed keyring cannot verify get the keyring of the
        newest ``debian-archive-keyring`` of a suite that is verified; this
        repeats while it makes progress. Fails when a suite stays unverified.
        """
        uris = archive_uris()
        self.keyrings = {}
        unverified = self._apt_update(uris)
        used: list[str] = []
        while unverified:
            verified = [s for s in SUITES if s not in unverified]
            source = next((s for s in reversed(verified) if s not in used), None)
            if source is None:
                raise ArchiveTrustError(
                    f"cannot verify the Release of {', '.join(sorted(unverified))}: no chain of trust from {KEYRING} "
                    f"(verified: {', '.join(verified) or 'none'}; keyrings tried from: {', '.join(used) or 'none'}); "
                    f"apt said:\n" + "\n".join(unverified.values()))
            used.append(source)
            keyring = self._keyring_from(source)
            _log(f"{', '.join(sorted(unverified))}: not verified by {KEYRING}; using {keyring} "
                 f"({KEYRING_PACKAGE} of {source}, itself verified)")
            for suite in unverified:
                self.keyrings[suite] = keyring
            unverified = self._apt_update(uris)
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
    except ArchiveTrustError:
        raise
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
