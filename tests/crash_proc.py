"""Process plumbing of the crash harness: run `medsearch` writers as real subprocesses, watch the
home from outside and SIGKILL the writer's process group at a planned moment.

A kill plan is one of
    time    ``at`` s after the attempt started (t ~ U(t_first, T) of the uninterrupted run)
    write   ``delay`` s after the ``nth`` change of catalog.db / its WAL seen from outside
    save    ``delay`` s after a temp file (``.NAME.*.tmp``, ``.DEST.partial-*``) appears in the
            watched folders: inside an atomic save, a backup stage, a feature-cache write
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

_SRC: Path | None = None  # a snapshot of the packages the children import (see snapshot_source)


def medsearch_exe() -> str:
    exe = Path(sys.executable).parent / "medsearch"
    if not exe.exists():
        raise SystemExit(f"no medsearch console script beside {sys.executable}; run `pip install -e .` first")
    return str(exe)


def snapshot_source(dst: Path) -> Path:
    """Copy medsearch/, indexer/, cli/, api/ so that edits made to the working tree during a long
    run cannot change the code under test halfway (children get it first on PYTHONPATH)."""
    global _SRC
    for pkg in ("medsearch", "indexer", "cli", "api"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    _SRC = dst
    return dst


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEARCH_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if _SRC is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(_SRC), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_cli(argv: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """One uninterrupted `medsearch` command (checks, restores): stdout and stderr captured."""
    return subprocess.run([medsearch_exe(), *argv], capture_output=True, text=True, env=child_env(), cwd=str(REPO),
                          timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


def is_temp(name: str) -> bool:
    """A file a writer creates before its rename: ``.x.tmp``, ``x.tmp``, ``.dest.partial-*``, ``.home.restoring-*``."""
    return name.endswith(".tmp") or (name.startswith(".") and (".partial-" in name or ".restoring-" in name))


def temp_files(*roots: Path) -> list[Path]:
    """Every temp file or stage folder under ``roots`` (recursive)."""
    out: list[Path] = []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            out += [Path(dirpath) / n for n in (*dirnames, *filenames) if is_temp(n)]
            dirnames[:] = [d for d in dirnames if not is_temp(d)]
    return sorted(out)


@dataclass(frozen=True)
class KillPlan:
    mode: str  # time | write | save
    at: float = 0.0
    nth: int = 0
    delay: float = 0.0


@dataclass
class Attempt:
    killed: bool
    step: str | None = None  # the step that was running when killed
    at: float = 0.0  # seconds since the attempt started
    into_step: float = 0.0  # seconds since the killed step started
    failed: str | None = None  # a step that exited non-zero on its own: a bug
    writes: int = 0  # catalog writes seen during the attempt
    mode: str | None = None
    tmp_at_kill: bool = False  # a temp file existed at the moment of the kill
    first_event: float | None = None  # seconds to the first write or temp file seen
    phase: str = ""  # what the writer was doing, where the harness can tell (listen: push/round)
    saw_tmp: bool = False  # a temp file was seen during the attempt


class Watch:
    """Observes a home from outside the process: catalog commits and temp files, by polling."""

    def __init__(self, home: Path, tmp_roots: Sequence[Path] = ()) -> None:
        self.home = home
        self.tmp_roots = [home / "indexes", home / "models", home / "spool", home / "images", *tmp_roots]
        self.writes = 0
        self.last_write = 0.0
        self.tmp_seen: float | None = None
        self.first_event: float | None = None
        self.tmp_now = False
        self._state: tuple = ()
        self._before = set(temp_files(*self.tmp_roots))  # left by an earlier kill (or planted): not this run's

    def poll(self, scan_tmp: bool = True) -> None:
        state = []
        for name in ("catalog.db", "catalog.db-wal"):
            try:
                st = os.stat(self.home / name)
                state.append((st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                state.append(None)
        state = tuple(state)
        now = time.monotonic()
        if state != self._state:
            if self._state and any(state):
                self.writes += 1
                self.last_write = now
                self.first_event = self.first_event or now
            self._state = state
        if scan_tmp:
            self.tmp_now = bool(set(temp_files(*self.tmp_roots)) - self._before)
            if self.tmp_now and self.tmp_seen is None:
                self.tmp_seen = now
                self.first_event = self.first_event or now

    def due(self, plan: KillPlan, t0: float) -> bool:
        now = time.monotonic()
        if plan.mode == "time":
            return now - t0 >= plan.at
        if plan.mode == "write":
            return self.writes >= plan.nth and now - self.last_write >= plan.delay
        return self.tmp_seen is not None and now - self.tmp_seen >= plan.delay


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the group holds only this step's processes
    except ProcessLookupError:
        pass
    p.wait()


def run_attempt(steps, home: Path, plan: KillPlan | None, log: Path, *, poll_s: float = 0.003,
                tmp_roots: Sequence[Path] = (), accept: Callable[[str, int, str], bool] | None = None) -> Attempt:  # fmt: skip
    """Run the steps (name, argv) in order with ``--home``; SIGKILL the running step's process group
    when ``plan`` says so. ``accept(name, rc, output)`` may call a non-zero exit fine (a rerun refused)."""
    exe, env = medsearch_exe(), child_env()
    watch = Watch(home, tmp_roots)
    t0 = time.monotonic()
    for name, argv in steps:
        ts = time.monotonic()
        with open(log, "ab") as out:
            out.write(f"\n$ medsearch {' '.join(argv)}\n".encode())
            out.flush()
            start = out.tell()
            p = subprocess.Popen([exe, *argv, "--home", str(home)], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, cwd=str(REPO), start_new_session=True)  # fmt: skip
            try:
                while (rc := p.poll()) is None:
                    watch.poll()
                    if plan is not None and watch.due(plan, t0):
                        kill_group(p)
                        now = time.monotonic()
                        return Attempt(True, name, now - t0, now - ts, writes=watch.writes, mode=plan.mode,
                                       tmp_at_kill=watch.tmp_now,
                                       first_event=None if watch.first_event is None else watch.first_event - t0)  # fmt: skip
                    time.sleep(poll_s)
            finally:  # the harness itself interrupted: leave no child running
                if p.poll() is None:
                    kill_group(p)
        watch.poll()
        if rc != 0:
            text = log.read_bytes()[start:].decode(errors="replace")
            if accept is None or not accept(name, rc, text):
                return Attempt(False, name, time.monotonic() - t0, failed=f"{name} exited {rc}: {text[-300:]!r}")
    fe = None if watch.first_event is None else watch.first_event - t0
    return Attempt(
        False, at=time.monotonic() - t0, writes=watch.writes, first_event=fe, saw_tmp=watch.tmp_seen is not None
    )


def draw_plan(rng: random.Random, span: float, writes: int, *, first: float = 0.0, saves: bool = True) -> KillPlan:
    """40% a uniform moment in [first, span], 40% just after a random catalog commit (when the writer
    commits), 20% during a save (a temp file in flight)."""
    r = rng.random()
    if r < 0.4 or (writes == 0 and not saves):
        return KillPlan("time", at=rng.uniform(first, span))
    if (r < 0.8 and writes) or not saves:
        return KillPlan("write", nth=rng.randint(1, max(1, writes)), delay=rng.uniform(0.0, 0.05))
    return KillPlan("save", delay=rng.uniform(0.0, 0.03))
