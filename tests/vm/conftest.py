"""pytest fixtures of the VM test bed.

``vm`` is one booted guest per kernel suite (session scope, parametrized
over ``SOCKSCOPE_KERNELS``; test ids carry the suite, so ``-k bookworm``
selects one).  Between tests a daemon left running is stopped.  A failing
test gets the guest console tail and daemon log attached to its report, and
the run ends with a per-kernel summary (also written to
``<logs>/summary.json``), including how the flow records compared with the
packet captures: flows judged, packet-probe misses the kernel counted
during those scenarios, and how many flows needed that allowance.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bed  # noqa: E402
import kernels  # noqa: E402

#: suite -> {"release", "boot_s", "error"}
_KERNEL_INFO: dict[str, dict] = defaultdict(dict)
#: suite -> outcome -> count
_OUTCOMES: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))


#: How long a daemon left running by a test gets to stop after a signal.
DAEMON_STOP_TIMEOUT_S = 15


@pytest.fixture(scope="session", params=kernels.selected_suites())
def vm_session(request):
    """The booted guest of one kernel suite, shared by all tests of that suite."""
    suite = request.param
    info = _KERNEL_INFO[suite]
    t0 = time.monotonic()
    # Extra guest ports to forward: the union of GUEST_FORWARDS of the
    # collected test modules (the guest is shared, so it is booted with all).
    forwards = sorted({int(p) for item in request.session.items
                       for p in getattr(getattr(item, "module", None), "GUEST_FORWARDS", ())})
    try:
        v = bed.VM(suite, extra_forwards=forwards)
        info["accounting"] = v.accounting  # filled by flowlib.Scenario.verdict
        info["release"] = v.kernel.release
        v.start()
    except Exception as e:  # recorded for the summary, then re-raised: never a skip
        info["error"] = str(e).splitlines()[0][:200]
        raise
    info["boot_s"] = round(v.boot_seconds, 1)
    info["guest_uptime_at_ready_s"] = v.guest_uptime_at_ready
    info["setup_s"] = round(time.monotonic() - t0, 1)
    yield v
    v.close()


@pytest.fixture(params=("btf", "guess"))
def offsets(request):
    """Where the daemon's struct offsets come from: BTF, or runtime guessing
    (what a kernel without BTF gets). Scenarios that take this run twice."""
    return request.param


@pytest.fixture
def vm(vm_session):
    """The current kernel's guest; a daemon still running after the test is stopped."""
    yield vm_session
    if vm_session.daemon is not None and vm_session.proc.poll() is None:
        # TERM first, so the daemon removes its probes and the next test
        # starts from a clean tracefs; KILL only when it does not stop.
        try:
            (vm_session.logdir / "sockscope.log").write_text(vm_session.daemon_log())
            vm_session.stop_daemon("TERM", timeout=DAEMON_STOP_TIMEOUT_S)
        except (OSError, bed.BedError):
            if vm_session.daemon is not None:
                try:
                    vm_session.stop_daemon("KILL", timeout=DAEMON_STOP_TIMEOUT_S)
                except (OSError, bed.BedError):
                    vm_session.daemon = None


def _suite_of(item) -> str | None:
    cs = getattr(item, "callspec", None)
    if cs is None:
        return None
    return cs.params.get("vm_session")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    suite = _suite_of(item)
    if suite is None:
        return
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        xfail = hasattr(rep, "wasxfail")
        _OUTCOMES[suite]["xpassed" if xfail and rep.passed else "xfailed" if xfail and rep.skipped else
                         "passed" if rep.passed else "skipped" if rep.skipped else
                         "failed" if rep.when == "call" else "error"] += 1
    if rep.failed:
        v = item.funcargs.get("vm") or item.funcargs.get("vm_session")
        if v is not None:
            rep.sections.append((f"VM {suite} diagnostics", v.diagnostics()))
        else:
            rep.sections.append((f"VM {suite}", f"kernel {suite} failed to boot; logs in {bed.logs_root() / suite}"))


def accounting_totals(scenarios: list[dict]) -> dict:
    """Sum of the judged flow scenarios of one kernel (see flowlib.Scenario.verdict)."""
    misses: dict[str, int] = defaultdict(int)
    for sc in scenarios:
        for probe, n in sc["misses"].items():
            misses[probe] += n
    return {"scenarios": len(scenarios), "flows": sum(sc["flows"] for sc in scenarios),
            "packet_probe_misses": sum(misses.values()), "misses_by_probe": dict(misses),
            "flows_short": sum(sc["flows_short"] for sc in scenarios),
            "flows_absent": sum(sc.get("flows_absent", 0) for sc in scenarios),
            "packets_short": sum(sc["packets_short"] for sc in scenarios),
            "bytes_short": sum(sc["bytes_short"] for sc in scenarios)}


def accounting_line(acc: dict) -> str:
    """One summary line from :func:`accounting_totals`."""
    by = ", ".join(f"{k} {v}" for k, v in sorted(acc["misses_by_probe"].items()) if v)
    return (f"flows vs capture: {acc['flows']} flows in {acc['scenarios']} scenarios; packet-probe misses "
            f"measured {acc['packet_probe_misses']}{f' ({by})' if by else ''}; {acc['flows_short']} flows "
            f"needed the allowance ({acc['packets_short']} packets, {acc['bytes_short']} bytes"
            + (f"; {acc['flows_absent']} of them with no record" if acc["flows_absent"] else "") + ")")


def pytest_terminal_summary(terminalreporter):
    if not _OUTCOMES and not _KERNEL_INFO:
        return
    tr = terminalreporter
    tr.section("per-kernel summary")
    summary = {}
    for suite in kernels.SUITES:
        if suite not in _OUTCOMES and suite not in _KERNEL_INFO:
            continue
        info = dict(_KERNEL_INFO.get(suite, {}))
        scenarios = info.pop("accounting", [])
        acc = {**accounting_totals(scenarios), "per_scenario": scenarios}
        oc = dict(_OUTCOMES.get(suite, {}))
        facts_file = bed.logs_root() / suite / "facts.json"
        facts = json.loads(facts_file.read_text()) if facts_file.exists() else {}
        summary[suite] = {**info, "outcomes": oc, "accounting": acc, "facts": facts}
        status = "FAIL" if oc.get("failed") or oc.get("error") or info.get("error") else "ok"
        boot = f"{info['boot_s']:.1f}s" if "boot_s" in info else "-"
        if info.get("guest_uptime_at_ready_s") is not None:
            boot += f" (guest uptime {info['guest_uptime_at_ready_s']:.1f}s)"
        tr.write_line(f"{status:4} {suite:9} {info.get('release', '?'):28} boot {boot}  "
                      + ", ".join(f"{n} {k}" for k, n in sorted(oc.items()))
                      + (f"  [{info['error']}]" if info.get("error") else ""))
        if scenarios:
            tr.write_line(f"     {accounting_line(acc)}")
            for sc in scenarios:
                if sc["flows_short"]:
                    tr.write_line(f"       allowance used by {sc['test']}: {sc['flows_short']} flows, "
                                  f"{sc['packets_short']} packets, {sc['bytes_short']} bytes "
                                  f"(misses {sc['misses_total']}"
                                  + (f"; {sc['flows_absent']} flows with no record" if sc.get("flows_absent") else "")
                                  + ")")
        missing = facts.get("filter_functions_missing")
        if missing is not None:
            tr.write_line(f"     not in available_filter_functions: {', '.join(missing) or 'none'}")
        if facts.get("filter_functions_ambiguous"):
            tr.write_line("     listed more than once: "
                          + ", ".join(f"{k} x{v}" for k, v in facts["filter_functions_ambiguous"].items()))
        if "kprobe_rejected" in facts:
            tr.write_line(f"     kprobe rejected: {', '.join(facts['kprobe_rejected']) or 'none'}; "
                          f"$argN: {'yes' if facts.get('kprobe_argn') else 'no'}, "
                          f"BTF args (sk->field): {'yes' if facts.get('kprobe_btf_args') else 'no'}")
        if "legacy_functions_present" in facts:
            tr.write_line(f"     other names present: {', '.join(facts['legacy_functions_present']) or 'none'}")
    out = bed.logs_root() / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
