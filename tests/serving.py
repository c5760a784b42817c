"""`medsearch serve` (or any server) as a real subprocess for tests: a free port, wait until ready, stop."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(
    cmd: list[str], log_path: Path, ready: Callable[[], bool], *, timeout: float = 300, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` (output to ``log_path``), wait until ``ready()`` is true, yield the process, stop it.

    ``ready`` may raise httpx errors or ValueError while the server starts. A server that exits, or is not
    ready within ``timeout`` seconds, fails the test with the end of its log.
    """
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if ready():
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not answer within {timeout:.0f} s")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
