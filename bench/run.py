"""pytunnel against ``ssh -N -D`` and asyncssh's ``forward_socks()``, side by side.

    .venv/bin/python bench/run.py            # the default run (3 rounds, under 5 min)
    .venv/bin/python bench/run.py --quick    # a smoke run of about a minute

A private OpenSSH sshd and loopback targets (source, sink, echo) are started here; each
subject is its own process connected to that sshd; a measuring client that speaks SOCKS5
on raw sockets drives them. Subjects take turns metric by metric, in an order that
rotates every round, and every ratio is taken between subjects of the same round.

Markdown on stdout, progress on stderr, raw samples as JSON (``--json``). A tool, not a
test: nothing here asserts a time. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import getpass
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import socks_client
import subjects
from subjects import Server, Subject, SubjectError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fixtures.keys import make_keys  # noqa: E402
from fixtures.sshd import SshdServer, sshd_available  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
SAME_CIPHER = "aes128-gcm@openssh.com"
SETTINGS = {"default": None, "same": SAME_CIPHER}
SETTING_TITLES = {
    "default": "Each program's default cipher (what users get)",
    "same": f"Same cipher for all ({SAME_CIPHER})",
}
LABELS = {
    "ssh": "ssh -D",
    "pytunnel": "pytunnel",
    "asyncssh": "asyncssh forward_socks",
    "pytunnel-live": "pytunnel, live view on",
    "pytunnel-master": "pytunnel via ssh -M master, handover (CPU: both)",
    "pytunnel-master-stdio": "pytunnel via ssh -M master, --master-mode stdio (CPU: both)",
    "pytunnel-master-proxy": "pytunnel via ssh -M master, --master-mode proxy (CPU: both)",
}
# The live view's cost does not depend on the cipher: measure it once, in "default".
LIVE = "pytunnel-live"
BUSY_WARNING = 0.10  # CPU share used by others before the run worth a warning
WARM_UP_SETUPS = 20
WARM_UP_BYTES = 8 * MIB
SETTLE = 0.2  # seconds between measurements, for closes and TIME_WAIT churn to finish

# sshd for the benchmark: the test fixture's settings, quieter (DEBUG1 would log every
# channel, costing the server CPU in the middle of the setups figure). MaxSessions does
# not limit direct-tcpip channels, so 1000 open connections need nothing more.
SSHD_OPTIONS = {"LogLevel": "INFO"}


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# -- what is measured --------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    digits: int = 1


@dataclass(frozen=True)
class Target:
    """``subject``'s figure (``base`` None) or its same-round ratio to ``base``."""

    what: str
    metric: str
    setting: str
    op: str  # ">=" or "<="
    value: float
    subject: str = "pytunnel"
    base: str | None = "ssh"
    unit: str = ""

    def met(self, figure: float) -> bool:
        return figure >= self.value if self.op == ">=" else figure <= self.value

    def text(self) -> str:
        if self.base is None:
            return f"{self.op} {self.value:g} {self.unit}"
        return f"{self.op} {self.value:g}x {LABELS[self.base]}"


@dataclass(frozen=True)
class Plan:
    rounds: int
    size: int
    setups: int
    conc: tuple[int, ...]
    conc_size: int
    open_conns: int
    subjects: tuple[str, ...]
    settings: tuple[str, ...]
    asyncssh_loop: str
    wait_quiet: float = 0.0

    def names(self, setting: str) -> list[str]:
        return [n for n in self.subjects if n != LIVE or setting == "default"]


def metrics_for(plan: Plan) -> list[Metric]:
    size = plan.size // MIB
    found = [
        Metric("down_mibs", f"download, 1 connection × {size} MiB (MiB/s)", True),
        Metric("up_mibs", f"upload, 1 connection × {size} MiB (MiB/s)", True),
        Metric("cpu_s_per_gib", "proxy CPU per GiB, single flows (s)", False, 2),
        Metric("setups_per_s", f"sequential setups ({plan.setups}) per second", True),
        Metric("setup_p50_ms", "setup latency p50 (ms)", False, 2),
        Metric("setup_p99_ms", "setup latency p99 (ms)", False, 2),
    ]
    conc_mib = plan.conc_size // MIB
    for k in plan.conc:
        found.append(
            Metric(f"conc{k}_s", f"{k} concurrent × {conc_mib} MiB, total time (s)", False, 2)
        )
    found += [
        Metric("rss_idle_mib", "RSS idle, after ready (MiB)", False),
        Metric("rss_open_mib", f"RSS with {plan.open_conns} open connections (MiB)", False),
        Metric("hwm_mib", "peak RSS over the whole round, VmHWM (MiB)", False),
    ]
    return found


def targets_for(plan: Plan) -> list[Target]:
    """The issue's targets, in the settings this run measures."""
    found = [
        Target("single-flow download", "down_mibs", "default", ">=", 1.0),
        Target("single-flow upload", "up_mibs", "default", ">=", 1.0),
        Target("single-flow download", "down_mibs", "same", ">=", 0.9),
        Target("single-flow upload", "up_mibs", "same", ">=", 0.9),
        Target("proxy CPU per GiB", "cpu_s_per_gib", "same", "<=", 1.3),
    ]
    for setting in SETTINGS:
        found += [
            Target("sequential setups/s", "setups_per_s", setting, ">=", 0.9),
            Target("p50 setup latency", "setup_p50_ms", setting, "<=", 1.2),
            Target("500 concurrent × 1 MiB", "conc500_s", setting, "<=", 1.0),
            Target("idle RSS", "rss_idle_mib", setting, "<=", 45, base=None, unit="MiB"),
            Target(
                f"RSS, {plan.open_conns} open connections", "rss_open_mib", setting, "<=", 150,
                base=None, unit="MiB",
            ),
        ]  # fmt: skip
    found += [
        Target("live view on: download", "down_mibs", "default", ">=", 0.95, LIVE, "pytunnel"),
        Target("live view on: upload", "up_mibs", "default", ">=", 0.95, LIVE, "pytunnel"),
    ]
    for setting in SETTINGS:
        for metric in metrics_for(plan):
            op = ">=" if metric.higher_is_better else "<="
            what = f"≥ asyncssh: {metric.label}"
            found.append(Target(what, metric.key, setting, op, 1.0, base="asyncssh"))
    keys = {m.key for m in metrics_for(plan)}
    return [
        t
        for t in found
        if t.setting in plan.settings
        and t.metric in keys
        and t.subject in plan.names(t.setting)
        and (t.base is None or t.base in plan.names(t.setting))
    ]


# -- one round -----------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 300 samples is a real sample)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


class Round:
    """All subjects of one round and one cipher setting, alive together, measured in
    turn."""

    def __init__(
        self,
        plan: Plan,
        server: Server,
        ports: dict[str, int],
        setting: str,
        order: list[str],
    ) -> None:
        self.plan = plan
        self.ports = ports
        self.setting = setting
        self.order = order
        cipher = SETTINGS[setting]
        self.subjects: dict[str, Subject] = {}
        for name in order:
            subject = subjects.SUBJECTS[name](name, server, cipher, ports["echo"])
            if isinstance(subject, subjects.AsyncsshSubject):
                subject.loop = plan.asyncssh_loop
            self.subjects[name] = subject
        self.results: dict[str, dict[str, Any]] = {name: {} for name in order}

    def run(self) -> None:
        try:
            for subject in self.subjects.values():
                subject.start()
                self.results[subject.name]["cipher"] = subject.negotiated
            names = self.order
            time.sleep(1.0)  # let start-up work (imports, auth) finish before "idle"
            for name in names:
                mem = subjects.memory_kib(self.subjects[name].pid)
                self.results[name]["rss_idle_mib"] = mem["VmRSS"] / 1024
            for name in names:
                self._warm_up(name)
            self._each(names, "setups", self._setups)
            self._each(names, "bulk", self._bulk)
            for k in self.plan.conc:
                self._each(names, f"conc{k}", functools.partial(self._concurrent, k=k))
            self._each(names, "open", self._open)
            for name in names:
                mem = subjects.memory_kib(self.subjects[name].pid)
                self.results[name]["hwm_mib"] = mem["VmHWM"] / 1024
        finally:
            for subject in self.subjects.values():
                subject.stop()

    def _each(self, names: list[str], what: str, measure: Callable[[str], None]) -> None:
        for name in names:
            self.subjects[name].check_alive()
            measure(name)
            self.subjects[name].check_alive()
            time.sleep(SETTLE)
        log(f"  {what}: " + ", ".join(f"{n} {self._brief(n, what)}" for n in names))

    def _brief(self, name: str, what: str) -> str:
        r = self.results[name]
        if what == "setups":
            return f"{r['setups_per_s']:.0f}/s p50 {r['setup_p50_ms']:.2f} ms"
        if what == "bulk":
            return f"down {r['down_mibs']:.0f} up {r['up_mibs']:.0f} MiB/s"
        if what == "open":
            return f"{r['rss_open_mib']:.1f} MiB"
        return f"{r[what + '_s']:.2f} s"

    def _warm_up(self, name: str) -> None:
        """Unrecorded: the first connections of a fresh process (and of its sshd
        session) pay for lazy set-up that no later one does; the first subject measured
        must not be the only one to pay."""
        port = self.subjects[name].port
        socks_client.setups(port, self.ports["echo"], WARM_UP_SETUPS)
        socks_client.download(port, self.ports["source"], WARM_UP_BYTES)
        socks_client.upload(port, self.ports["sink"], WARM_UP_BYTES)

    def _setups(self, name: str) -> None:
        port = self.subjects[name].port
        wall, latencies = socks_client.setups(port, self.ports["echo"], self.plan.setups)
        ms = [x * 1000 for x in latencies]
        self.results[name].update(
            setups_per_s=len(latencies) / wall,
            setup_p50_ms=percentile(ms, 0.50),
            setup_p99_ms=percentile(ms, 0.99),
            setup_latencies_ms=[round(x, 4) for x in ms],
        )

    def _bulk(self, name: str) -> None:
        subject = self.subjects[name]
        size = self.plan.size
        cpu_before = subject.cpu_seconds()
        down = socks_client.download(subject.port, self.ports["source"], size)
        up = socks_client.upload(subject.port, self.ports["sink"], size)
        cpu = subject.cpu_seconds() - cpu_before
        self.results[name].update(
            down_mibs=size / MIB / down,
            up_mibs=size / MIB / up,
            cpu_s=cpu,
            cpu_s_per_gib=cpu / (2 * size / GIB),
        )

    def _concurrent(self, name: str, *, k: int) -> None:
        subject = self.subjects[name]
        cpu_before = subject.cpu_seconds()
        elapsed = socks_client.concurrent_download(
            subject.port, self.ports["source"], k, self.plan.conc_size
        )
        self.results[name][f"conc{k}_s"] = elapsed
        self.results[name][f"conc{k}_cpu_s"] = subject.cpu_seconds() - cpu_before

    def _open(self, name: str) -> None:
        subject = self.subjects[name]
        held = socks_client.open_many(subject.port, self.ports["echo"], self.plan.open_conns)
        try:
            time.sleep(0.5)  # let the proxy finish whatever the last opens started
            mem = subjects.memory_kib(subject.pid)
            self.results[name]["rss_open_mib"] = mem["VmRSS"] / 1024
        finally:
            for sock in held:
                sock.close()


# -- the whole run -------------------------------------------------------------------


@contextlib.contextmanager
def targets_process(workdir: Path) -> Iterator[dict[str, int]]:
    argv = [sys.executable, str(Path(__file__).with_name("targets.py"))]
    proc, out = subjects.spawn(argv, workdir, "targets")
    try:
        ports = subjects.read_first_line(proc, out, 15.0, "targets")
        yield {k: int(v) for k, v in ports.items()}
    finally:
        subjects.stop_process(proc)


@contextlib.contextmanager
def private_sshd(workdir: Path) -> Iterator[Server]:
    keys = make_keys(workdir / "keys")
    sshd = SshdServer(keys, workdir / "sshd", **SSHD_OPTIONS)
    sshd.start()
    try:
        yield Server(
            host=sshd.host,
            port=sshd.port,
            user=getpass.getuser(),
            key=sshd.client_key,
            known_hosts=sshd.known_hosts,
            workdir=workdir,
        )
    finally:
        sshd.stop()  # by PID, with its per-connection children


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError as exc:
            return f"unavailable ({exc})"
        return (out.stdout + out.stderr).strip().splitlines()[0]

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    source = pytunnel_source()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "openssh": first_line(["ssh", "-V"]),
        "pytunnel": first_line([subjects.PYTUNNEL, "-V"]),
        "pytunnel_source": str(source),
        "pytunnel_source_sha256": source_digest(source),
        "git": first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "asyncssh": importlib.metadata.version("asyncssh"),
        "uvloop": importlib.metadata.version("uvloop"),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": str(len(os.sched_getaffinity(0))),
    }


def pytunnel_source() -> Path:
    """The ``tunnel`` package the subjects will import (PYTHONPATH may point elsewhere
    than the editable install, for example at an exported commit)."""
    out = subprocess.run(
        [sys.executable, "-c", "import tunnel; print(tunnel.__file__)"],
        capture_output=True,
        text=True,
        timeout=30,
        env=subjects.clean_env(),
        cwd="/",  # as for the console script: not the current directory first on sys.path
        check=True,
    )
    return Path(out.stdout.strip()).parent


def source_digest(package: Path) -> str:
    """A digest of the package's sources: the tree may change under a long run."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run(plan: Plan, workdir: Path) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    with targets_process(workdir) as ports, private_sshd(workdir) as server:
        log(f"sshd on 127.0.0.1:{server.port}, targets {ports}")
        for r in range(plan.rounds):
            for setting in plan.settings:
                names = plan.names(setting)
                shift = r % len(names)
                order = names[shift:] + names[:shift]
                # Nothing of ours runs now: whatever keeps the CPUs busy is someone else.
                busy = wait_quiet(plan.wait_quiet, sample=0.5)
                log(
                    f"round {r + 1}/{plan.rounds}, {setting} cipher, order {', '.join(order)}"
                    f" (machine {busy:.0%} busy)"
                )
                one = Round(plan, server, ports, setting, order)
                one.run()
                rounds.append(
                    {
                        "round": r,
                        "setting": setting,
                        "order": order,
                        "machine_busy_before": round(busy, 3),
                        "results": one.results,
                    }
                )
    return {"rounds": rounds}


# -- the report ----------------------------------------------------------------------


def collect(rounds: list[dict[str, Any]], setting: str, subject: str, key: str) -> list[float]:
    return [
        float(r["results"][subject][key])
        for r in rounds
        if r["setting"] == setting and key in r["results"].get(subject, {})
    ]


def ratios(
    rounds: list[dict[str, Any]], setting: str, subject: str, base: str, key: str
) -> list[float]:
    found = []
    for r in rounds:
        if r["setting"] != setting:
            continue
        a, b = r["results"].get(subject, {}), r["results"].get(base, {})
        if key in a and key in b and b[key]:
            found.append(float(a[key]) / float(b[key]))
    return found


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(plan: Plan, data: dict[str, Any]) -> dict[str, Any]:
    """Medians, same-round ratios (to ssh -D, to asyncssh, live view on to off) and the
    verdict on every target."""
    rounds = data["rounds"]
    summary: dict[str, Any] = {}
    for setting in plan.settings:
        names = plan.names(setting)
        per: dict[str, Any] = {"cipher": {}, "median": {}, "ratio": {}, "spread": {}}
        for subject in names:
            ciphers = {
                r["results"][subject].get("cipher", "")
                for r in rounds
                if r["setting"] == setting and subject in r["results"]
            }
            per["cipher"][subject] = ", ".join(sorted(c for c in ciphers if c)) or "unknown"
            per["median"][subject] = {
                m.key: median_or_none(collect(rounds, setting, subject, m.key))
                for m in metrics_for(plan)
            }
            for base in names:
                if base == subject:
                    continue
                pair = f"{subject}/{base}"
                per["ratio"][pair], per["spread"][pair] = {}, {}
                for m in metrics_for(plan):
                    found = ratios(rounds, setting, subject, base, m.key)
                    per["ratio"][pair][m.key] = median_or_none(found)
                    # The lowest and highest same-round ratio: how far one round can be
                    # trusted on this machine.
                    per["spread"][pair][m.key] = [min(found), max(found)] if found else None
        summary[setting] = per
    verdicts = []
    for target in targets_for(plan):
        per = summary[target.setting]
        spread = None
        if target.base is None:
            figure = per["median"][target.subject][target.metric]
            values = collect(rounds, target.setting, target.subject, target.metric)
            spread = [min(values), max(values)] if values else None
        else:
            figure = per["ratio"][f"{target.subject}/{target.base}"][target.metric]
            spread = per["spread"][f"{target.subject}/{target.base}"][target.metric]
        verdicts.append(
            {
                "what": target.what,
                "setting": target.setting,
                "subject": target.subject,
                "base": target.base,
                "metric": target.metric,
                "target": target.text(),
                "threshold": target.value,
                "figure": figure,
                "spread": spread,
                "met": None if figure is None else target.met(figure),
            }
        )
    summary["targets"] = verdicts
    return summary


def _ratio_cell(
    ratio: float | None,
    metric: Metric,
    *,
    mark: bool = False,
    spread: list[float] | None = None,
) -> str:
    if ratio is None:
        return "n/a"
    text = f"{ratio:.2f}x"
    if spread is not None and spread[0] != spread[1]:
        text += f" ({spread[0]:.2f}–{spread[1]:.2f})"
    if mark:
        better = ratio >= 1 if metric.higher_is_better else ratio <= 1
        text += " ✓" if better else " ✗"
    return text


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |"]
    lines.append("|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _targets_section(plan: Plan, verdicts: list[dict[str, Any]]) -> list[str]:
    """One row per target; the many "pytunnel ≥ asyncssh" checks fold into one row per
    setting that names the metrics where it is not."""
    if not verdicts:
        return []
    verdict_text = {None: "n/a", True: "met", False: "**missed**"}
    rows = []
    for v in verdicts:
        if v["base"] == "asyncssh":
            continue
        figure, spread = v["figure"], v["spread"]
        unit = "" if v["base"] is None else "x"
        shown = "n/a" if figure is None else f"{figure:.3g}{unit}"
        rounds = "" if spread is None else f"{spread[0]:.3g}–{spread[1]:.3g}{unit}"
        verdict = verdict_text[v["met"]]
        if spread is not None and spread[0] < v["threshold"] < spread[1]:
            verdict += " (rounds on both sides)"
        rows.append([f"{v['what']} ({v['setting']})", shown, rounds, v["target"], verdict])
    for setting in plan.settings:
        mine = [v for v in verdicts if v["base"] == "asyncssh" and v["setting"] == setting]
        if not mine:
            continue
        labels = {m.key: m.label for m in metrics_for(plan)}
        worse = [
            f"{labels[v['metric']]} {v['figure']:.2f}x"
            for v in mine
            if v["met"] is False and v["figure"] is not None
        ]
        better = sum(1 for v in mine if v["met"])
        rows.append(
            [
                f"pytunnel ≥ asyncssh forward_socks on every metric ({setting})",
                f"{better} of {len(mine)}",
                "",
                "all",
                "met" if not worse else "**missed**: " + "; ".join(worse),
            ]
        )
    met = sum(1 for row in rows if row[-1].startswith("met"))
    head = ["target (setting)", "pytunnel", "rounds (low–high)", "wanted", "verdict"]
    return [
        "### Targets",
        "",
        *_table(head, rows),
        f"{met} of {len(rows)} targets met.",
        "",
    ]


def markdown(plan: Plan, meta: dict[str, str], summary: dict[str, Any]) -> str:
    metrics = metrics_for(plan)
    lines = [
        f"pytunnel benchmark, {meta['date']}: {plan.rounds} round(s), {meta['cpus']} CPU(s) "
        f"({meta['cpu']}), Linux {meta['kernel']}, took {meta['elapsed_s']} s, machine "
        f"{meta['busy_before']} busy before the run and at most "
        f"{meta['busy_between_rounds_max']} between rounds",
        "",
        f"{meta['openssh']} · {meta['pytunnel']} (sources `{meta['pytunnel_source']}`, "
        f"digest {meta['pytunnel_source_sha256']}; repo at {meta['git']}) · "
        f"asyncssh {meta['asyncssh']} · "
        f"uvloop {meta['uvloop']} · Python {meta['python']} · the asyncssh subject runs on "
        f"{plan.asyncssh_loop}",
        "",
    ]
    if "warning" in meta:
        lines += [f"**Warning: {meta['warning']}.**", ""]
    for setting in plan.settings:
        per = summary[setting]
        both = "pytunnel" in plan.names(setting)
        names = [n for n in plan.names(setting) if n != LIVE or not both]
        lines += [f"### {SETTING_TITLES[setting]}", ""]
        lines.append(
            "Negotiated cipher: "
            + "; ".join(f"{LABELS[n]} `{per['cipher'][n]}`" for n in plan.names(setting))
        )
        lines.append("")
        head = ["metric", *(LABELS[n] for n in names)]
        pairs = [(n, "ssh") for n in names if n != "ssh" and "ssh" in names]
        if "pytunnel" in names and "asyncssh" in names:
            pairs.append(("pytunnel", "asyncssh"))
        head += [f"{a} / {LABELS[b]}" for a, b in pairs]
        rows = []
        for metric in metrics:
            row = [metric.label]
            row += [fmt(per["median"][n][metric.key], metric.digits) for n in names]
            for a, b in pairs:
                ratio = per["ratio"][f"{a}/{b}"][metric.key]
                spread = per["spread"][f"{a}/{b}"][metric.key] if a == "pytunnel" else None
                row.append(_ratio_cell(ratio, metric, mark=b == "asyncssh", spread=spread))
            rows.append(row)
        lines += _table(head, rows)
        if LIVE in plan.names(setting) and "pytunnel" in names:
            lines += ["pytunnel's live status view (stderr on a terminal) against plain log", ""]
            head = ["metric", "view off", "view on", "on / off"]
            rows = [
                [
                    m.label,
                    fmt(per["median"]["pytunnel"][m.key], m.digits),
                    fmt(per["median"][LIVE][m.key], m.digits),
                    _ratio_cell(
                        per["ratio"][f"{LIVE}/pytunnel"][m.key],
                        m,
                        spread=per["spread"][f"{LIVE}/pytunnel"][m.key],
                    ),
                ]
                for m in metrics
            ]
            lines += _table(head, rows)
    lines += _targets_section(plan, summary["targets"])
    lines += [
        "Figures are medians over rounds; ratios are medians of same-round ratios. Higher is "
        "better for MiB/s and setups/s, lower for everything else. ✓/✗: pytunnel better or "
        "worse than asyncssh forward_socks.",
        "",
    ]
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="Benchmark pytunnel against ssh -D and asyncssh forward_socks on loopback."
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; --quick 1)")
    parser.add_argument("--size", type=int, help="MiB per single-flow transfer (256; quick 32)")
    parser.add_argument("--setups", type=int, help="sequential setups per round (500; quick 50)")
    parser.add_argument(
        "--conc", help="concurrent connection counts, comma-separated (100,500; quick 20,50)"
    )
    parser.add_argument("--conc-size", type=int, default=1, help="MiB per concurrent connection")
    parser.add_argument(
        "--open",
        type=int,
        dest="open_conns",
        help="connections held open for RSS (1000; quick 200)",
    )
    parser.add_argument(
        "--only",
        default=",".join(subjects.SUBJECTS),
        help="subjects, comma-separated, from " + ", ".join(subjects.SUBJECTS) + " (default all;"
        f" {LIVE} runs in the default cipher setting only)",
    )
    parser.add_argument(
        "--settings",
        default="default,same",
        help=f"cipher settings: default (each program's own), same ({SAME_CIPHER})",
    )
    parser.add_argument(
        "--asyncssh-loop", choices=("uvloop", "asyncio"), default="uvloop",
        help="event loop of the asyncssh subject (pytunnel runs on uvloop)",
    )  # fmt: skip
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO / "bench" / "results" / "latest.json",
        help="where to write raw samples (default bench/results/latest.json)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help=f"before the run and each round, wait up to this long for other load to stay "
        f"under {BUSY_WARNING:.0%}% for 3 s",  # %% for argparse
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    quick = args.quick
    chosen = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(chosen) - set(subjects.SUBJECTS)
    if unknown or not chosen:
        parser.error(f"--only: unknown subject(s) {sorted(unknown)}")
    settings = tuple(s.strip() for s in args.settings.split(",") if s.strip())
    if set(settings) - set(SETTINGS) or not settings:
        parser.error("--settings: choose from default, same")
    conc = args.conc or ("20,50" if quick else "100,500")
    plan = Plan(
        rounds=args.rounds or (1 if quick else 3),
        size=(args.size or (32 if quick else 256)) * MIB,
        setups=args.setups or (50 if quick else 500),
        conc=tuple(int(k) for k in conc.split(",") if k.strip()),
        conc_size=args.conc_size * MIB,
        open_conns=args.open_conns or (200 if quick else 1000),
        subjects=tuple(n for n in subjects.SUBJECTS if n in chosen),
        settings=tuple(s for s in SETTINGS if s in settings),
        asyncssh_loop=args.asyncssh_loop,
        wait_quiet=args.wait_quiet,
    )
    # pytunnel-live alone has nothing to do in the "same" setting.
    plan = dataclasses.replace(plan, settings=tuple(s for s in plan.settings if plan.names(s)))
    if not plan.settings:
        parser.error(f"{LIVE} runs only in the default setting")
    return plan, args


def wait_quiet(limit: float, *, sample: float = 1.0, calm: int = 3) -> float:
    """How busy the machine is (0..1, over ``sample`` seconds), while nothing of ours
    runs. With ``limit`` > 0, first wait up to ``limit`` seconds for ``calm`` samples in
    a row under BUSY_WARNING (shared machines, CI runners)."""
    started = time.monotonic()
    said = -math.inf
    quiet = 0
    while True:
        busy = subjects.machine_load(sample)["busy"]
        quiet = quiet + 1 if busy <= BUSY_WARNING else 0
        waited = time.monotonic() - started
        if limit <= 0 or quiet >= calm or waited >= limit:
            return busy
        if busy > BUSY_WARNING and waited - said >= 30:
            said = waited
            log(f"machine {busy:.0%} busy; waiting (up to {limit:g} s) for quiet")


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        log(f"warning: RLIMIT_NOFILE is {hard}; holding many connections may fail")


def main(argv: Sequence[str] | None = None) -> int:
    plan, args = parse_args(argv)
    if not sshd_available():
        log("OpenSSH sshd is not installed (/usr/sbin/sshd); see README (bash .ci/setup)")
        return 2
    if "ssh" in plan.subjects and shutil.which(subjects.SSH) is None:
        log("the OpenSSH client (ssh) is not installed")
        return 2
    # The client holds every connection it opens; sshd and the subjects inherit this too.
    raise_nofile(plan.open_conns * 3 + 256)
    meta = versions()
    busy = wait_quiet(plan.wait_quiet)
    started = time.monotonic()
    meta["busy_before"] = f"{busy:.0%}"
    if busy > BUSY_WARNING:
        log(f"warning: the machine was {busy:.0%} busy before the run; figures will be noisy")
    workdir = Path(tempfile.mkdtemp(prefix="pytunnel-bench-"))
    try:
        data = run(plan, workdir)
    except (SubjectError, socks_client.ClientError, OSError) as exc:
        log(f"failed: {exc} (logs in {workdir})")
        args.keep = True
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if source_digest(Path(meta["pytunnel_source"])) != meta["pytunnel_source_sha256"]:
        meta["warning"] = f"pytunnel's sources in {meta['pytunnel_source']} changed during the run"
        log(f"warning: {meta['warning']}")
    summary = summarize(plan, data)
    busiest = max(r["machine_busy_before"] for r in data["rounds"])
    meta["busy_between_rounds_max"] = f"{busiest:.0%}"
    elapsed = time.monotonic() - started
    meta["elapsed_s"] = f"{elapsed:.0f}"
    sys.stdout.write(markdown(plan, meta, summary) + "\n")
    sys.stdout.flush()
    record = {
        "meta": meta,
        "plan": {**plan.__dict__, "same_cipher": SAME_CIPHER},
        "rounds": data["rounds"],
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
    log(f"done in {elapsed:.0f} s; raw samples in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
