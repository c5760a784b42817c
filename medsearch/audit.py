"""A tamper-evident audit log: JSON lines joined by a SHA-256 hash chain.

Every line is one JSON object ``{"seq": n, "prev": H, "ts": ..., ...fields}`` where ``seq``
counts records from 1 across all files of the log and ``prev`` is the hex SHA-256 of the
previous line's bytes (without its newline); the first record of a new log has ``prev`` =
64 zeros. Editing a line breaks the link the next line holds, removing or reordering lines
breaks the ``seq`` order and a link. ``verify`` names the first line that was changed, removed
or reordered.

Files (``path`` = ``HOME/audit.log``)::

    audit.log            the file being written
    audit.log.000001     rotated files, oldest first; never renamed again
    audit.log.head       {"seq", "hash", "file"} of the last line written: catches a removed
                         or edited *last* line, which no later line links to

When ``audit.log`` would grow beyond ``max_bytes`` it is renamed to the next numbered file and
the new ``audit.log`` starts with an ``audit.start`` record whose ``prev`` is the hash of the
old file's last line, so the chain runs unbroken through every file.

A chain without a secret proves order and integrity against edits made *without* rewriting
everything after them: an operator anchors it by copying ``verify``'s head (seq + hash)
elsewhere from time to time (README, "Audit log"). Several processes may append to one log:
writes take an advisory lock and pick up lines other writers added.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import InvalidInput, StorageError

GENESIS = "0" * 64
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_RESERVED = ("seq", "prev", "ts")
_ROTATED = re.compile(r"\.(\d{6,})$")


def line_hash(raw: bytes) -> str:
    """Hex SHA-256 of one line's bytes (no trailing newline): what the next line's ``prev`` holds."""
    return hashlib.sha256(raw).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def log_files(path: Path) -> list[Path]:
    """The files of the log at ``path`` in chain order: rotated ones by number, then ``path``."""
    path = Path(path)
    rotated = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            m = _ROTATED.search(p.name)
            if m and p.name[: m.start()] == path.name and p.is_file():
                rotated.append((int(m.group(1)), p))
    out = [p for _, p in sorted(rotated)]
    if path.is_file():
        out.append(path)
    return out


def head_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".head")


def _last_line(path: Path) -> tuple[bytes | None, int]:
    """(the last complete line of ``path`` or None, the byte offset just after it).

    Bytes after the last newline (a write cut short by a crash) are not a line.
    """
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos, tail = end, b""
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            cut = tail.rfind(b"\n")
            if cut < 0:
                continue
            start = tail.rfind(b"\n", 0, cut)
            if start >= 0 or pos == 0:
                return tail[start + 1 : cut], pos + cut + 1
    return None, 0


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The record on a line, or None when it is not a JSON object with an int seq and a prev hash."""
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or type(rec.get("seq")) is not int or not isinstance(rec.get("prev"), str):
        return None
    return rec


def _is_legacy(raw: bytes) -> bool:
    """A JSON object line with no chain fields: written by medsearch before the log was chained."""
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(rec, dict) and "seq" not in rec and "prev" not in rec and "ts" in rec


class AuditLog:
    """Append records to a hash-chained log. ``path=None``: records go to the ``medsearch.audit`` logger.

    ``max_bytes``: rotate before a write would make the file larger (0 = never);
    ``fsync``: fsync every line (durable across power loss; costs a disk flush per record).
    """

    def __init__(self, path: Path | None, *, max_bytes: int = DEFAULT_MAX_BYTES, fsync: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.max_bytes = int(max_bytes)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._logger = logging.getLogger("medsearch.audit")
        self._fd: int | None = None
        self._stamp: tuple[int, int] | None = None  # (inode, size) after our last write
        self._seq = 0  # seq of the last record
        self._prev = GENESIS  # hash of the last line
        self._pending: list[dict[str, Any]] = []  # records to write first (recovery notes)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                self._sync_tail()
                if self._seq:
                    self._write_head()

    # ------------------------------------------------------------------ writing
    def write(self, **fields: Any) -> dict[str, Any]:
        """Append one record; returns ``{"seq", "hash"}`` of its line.

        Raises StorageError when the line cannot be written (full disk): the file is left
        ending with the previous complete line.
        """
        if self.path is None:
            self._logger.info(json.dumps({"ts": _now(), **fields}, ensure_ascii=False, default=str,
                                         separators=(",", ":")))  # fmt: skip
            return {"seq": None, "hash": None}
        with self._lock, self._locked():
            self._sync_tail()
            if self._pending:
                for rec in self._pending:
                    self._append(rec)
                self._pending = []
            self._append(fields)
            self._write_head()
            return {"seq": self._seq, "hash": self._prev}

    def _append(self, fields: dict[str, Any]) -> None:
        assert self.path is not None
        raw = self._encode(self._seq + 1, self._prev, fields)
        size = self._stamp[1] if self._stamp else 0
        if self.max_bytes and size > 0 and size + len(raw) + 1 > self.max_bytes:
            self._rotate()
            raw = self._encode(self._seq + 1, self._prev, fields)
        self._write_line(raw)

    @staticmethod
    def _encode(seq: int, prev: str, fields: dict[str, Any]) -> bytes:
        rec = {"seq": seq, "prev": prev, "ts": _now(), **{k: v for k, v in fields.items() if k not in _RESERVED}}
        return json.dumps(rec, ensure_ascii=False, default=str, separators=(",", ":")).encode("utf-8")

    def _write_line(self, raw: bytes) -> None:
        assert self.path is not None
        fd = self._open()
        before = os.fstat(fd).st_size
        data = raw + b"\n"
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            if self.fsync:
                os.fsync(fd)
        except OSError as e:
            try:  # never leave half a line: the next writer would append to it
                os.ftruncate(fd, before)
            except OSError:
                pass
            self._stamp = None
            raise StorageError(
                f"could not write to the audit log {self.path.name}: {e.strerror or e}",
                hint="free disk space (or fix the disk); requests are refused until the audit log can be written",
            ) from e
        st = os.fstat(fd)
        self._stamp = (st.st_ino, st.st_size)
        self._seq += 1
        self._prev = line_hash(raw)

    def _rotate(self) -> None:
        """Rename the current file to the next number; the new file opens with an ``audit.start`` record."""
        assert self.path is not None
        files = log_files(self.path)
        last = max((int(m.group(1)) for p in files if (m := _ROTATED.search(p.name))), default=0)
        target = self.path.with_name(f"{self.path.name}.{last + 1:06d}")
        self._close_fd()
        os.replace(self.path, target)
        self._stamp = None
        self._write_line(self._encode(self._seq + 1, self._prev, {"action": "audit.start", "continues": target.name}))

    def _write_head(self) -> None:
        assert self.path is not None
        hp = head_path(self.path)
        tmp = hp.with_name(f".{hp.name}.tmp")
        try:
            tmp.write_text(json.dumps({"seq": self._seq, "hash": self._prev, "file": self.path.name}))
            os.replace(tmp, hp)
        except OSError:  # the head is a check on the tail, not the record: a full disk must not lose the line
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ state
    def _open(self) -> int:
        assert self.path is not None
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _sync_tail(self) -> None:
        """Pick up where the log ends now (another process may have written or rotated it)."""
        assert self.path is not None
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_ino, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp == self._stamp:
            return
        self._close_fd()
        if stamp is not None and stamp[1] > 0:
            raw, end = _last_line(self.path)
            if end < stamp[1]:  # a line cut short by a crash: never part of the chain
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                self._pending.append({"action": "audit.recovered", "dropped_bytes": stamp[1] - end})
            legacy = raw is not None and _parse(raw) is None and _is_legacy(raw)
            if legacy:  # a log from before the chain: kept as it is, beside the new chain
                aside = self.path.with_name(f"{self.path.name}.unchained-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
                os.replace(self.path, aside)
                self._pending.append({"action": "audit.unchained_log_kept", "file": aside.name})
            elif raw is not None:
                self._continue_from(raw, self.path)
                self._stamp = (stamp[0], end)
                return
        # the current file is missing or empty: continue from the newest rotated file, if any
        rotated = [p for p in log_files(self.path) if p != self.path]
        raw = _last_line(rotated[-1])[0] if rotated else None
        if raw is not None:
            self._continue_from(raw, rotated[-1])
        else:
            self._seq, self._prev = 0, GENESIS
        self._stamp = None
        self._write_line(self._encode(self._seq + 1, self._prev, {
            "action": "audit.start", "continues": rotated[-1].name if raw is not None else None}))  # fmt: skip

    def _continue_from(self, raw: bytes, where: Path) -> None:
        rec = _parse(raw)
        if rec is None:
            raise InvalidInput(
                f"the last line of the audit log {where.name} is not an audit record (edited or damaged)",
                hint="run `medsearch audit verify` to see where; move the damaged files aside to start a new chain",
            )
        self._seq, self._prev = rec["seq"], line_hash(raw)

    def _locked(self) -> AbstractContextManager[None]:
        assert self.path is not None
        return locked(self.path)

    def close(self) -> None:
        with self._lock:
            self._close_fd()


def locked(path: Path) -> AbstractContextManager[None]:
    """Hold the writers' lock of the log at ``path``: no line is appended and no file rotated meanwhile."""
    return _flock(Path(path).with_name(f".{Path(path).name}.lock"))


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (released by the OS if the process dies)."""
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: one process per log
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------- verification
@dataclass(frozen=True)
class Problem:
    """The first break in the chain: which line, and what happened to it."""

    kind: str  # changed, removed, reordered, incomplete
    file: str
    line: int  # 1-based line within ``file``
    seq: int | None  # the record it concerns (the missing one for ``removed``)
    message: str


@dataclass(frozen=True)
class Verification:
    """What ``verify`` found: ``ok``, and otherwise the first ``problem``; ``head_*`` = the last record."""

    ok: bool
    files: list[str]
    records: int
    head_seq: int
    head_hash: str
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lines(files: list[Path], start: int = 0) -> Iterator[tuple[int, Path, int, bytes, bool]]:
    """(file index, file, line number, raw bytes, complete) for every line, in chain order."""
    for fi in range(start, len(files)):
        with open(files[fi], "rb") as f:
            for n, raw in enumerate(f, 1):
                yield fi, files[fi], n, raw.rstrip(b"\n"), raw.endswith(b"\n")


def _find_seq(files: list[Path], seq: int, after: tuple[int, int]) -> tuple[Path, int] | None:
    """Where record ``seq`` is, looking only after position ``after`` = (file index, line)."""
    for fi, p, n, raw, _ in _lines(files, after[0]):
        if (fi, n) > after and (rec := _parse(raw)) is not None and rec["seq"] == seq:
            return p, n
    return None


def _read_head(base: Path) -> tuple[int, str] | None:
    try:
        head = json.loads(head_path(base).read_text())
        return int(head["seq"]), str(head["hash"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify(path_or_dir: str | Path) -> Verification:
    """Check the chain of the log at a file path (``HOME/audit.log``) or in a folder (its ``audit.log``).

    Streams the files once (a second pass only to tell a removed line from a moved one).
    ``problem`` names the first line changed, removed or reordered.
    """
    p = Path(path_or_dir)
    base = p / "audit.log" if p.is_dir() else p
    if (m := _ROTATED.search(base.name)) is not None:  # a rotated member: check the log it belongs to
        base = base.with_name(base.name[: m.start()])
    files = log_files(base)
    if not files:
        raise InvalidInput(f"no audit log at {base}", hint="give the log file (HOME/audit.log) or its folder")
    head = _read_head(base)
    head_line: str | None = None  # hash of the line whose seq the head names
    prev_hash, prev_at, expected = GENESIS, None, 1
    problem: Problem | None = None

    def at(f: Path, n: int) -> str:
        return f"{f.name} line {n}"

    for fi, f, n, raw, complete in _lines(files):
        if not complete:
            problem = Problem("incomplete", f.name, n, None, f"{at(f, n)} is cut short (no newline): a write that "
                              "did not finish, or the end of the file was removed")  # fmt: skip
            break
        rec = _parse(raw)
        if rec is None:
            problem = Problem("changed", f.name, n, None, f"{at(f, n)} was changed: it is not an audit record")
            break
        seq, linked = rec["seq"], rec["prev"] == prev_hash
        if seq != expected:
            problem = _misplaced(files, fi, f, n, seq, expected, linked, prev_at, at)
            break
        if not linked:
            if prev_at is None:
                problem = Problem("removed", f.name, n, seq, f"{at(f, n)} links to a line that is not there: the "
                                  "start of the log was removed")  # fmt: skip
            else:
                problem = Problem("changed", prev_at[0].name, prev_at[1], expected - 1,
                                  f"{at(*prev_at)} was changed: its SHA-256 no longer matches the prev that "
                                  f"{at(f, n)} recorded")  # fmt: skip
            break
        prev_hash, prev_at, expected = line_hash(raw), (f, n), seq + 1
        if head is not None and seq == head[0]:
            head_line = prev_hash
    last = expected - 1
    notes: list[str] = []
    if problem is None:
        problem = _check_head(base, head, head_line, last, prev_at, notes)
    return Verification(ok=problem is None, files=[f.name for f in files], records=last,
                        head_seq=last, head_hash=prev_hash, problem=problem, notes=notes)  # fmt: skip


def _misplaced(files: list[Path], fi: int, f: Path, n: int, seq: int, expected: int, linked: bool,
               prev_at: tuple[Path, int] | None, at: Any) -> Problem:  # fmt: skip
    """A line whose seq is not the next one: edited, moved, or lines before it removed."""
    if linked:  # the chain holds, only the number differs: the line itself was edited
        return Problem("changed", f.name, n, seq, f"{at(f, n)} was changed: it says seq {seq}, "
                       f"its place in the chain is seq {expected}")  # fmt: skip
    if seq < expected:
        return Problem("reordered", f.name, n, seq, f"{at(f, n)} was moved: record seq {seq} comes after "
                       f"seq {expected - 1}")  # fmt: skip
    found = _find_seq(files, expected, (fi, n))
    if found is not None:
        return Problem("reordered", f.name, n, seq, f"{at(f, n)} is out of order: it holds seq {seq} where "
                       f"seq {expected} belongs (that record is later, at {at(*found)})")  # fmt: skip
    gone = f"record seq {expected}" if seq == expected + 1 else f"records seq {expected}-{seq - 1}"
    before = "at the start of the log" if prev_at is None else f"after {at(*prev_at)}"
    return Problem("removed", f.name, n, expected, f"{gone} removed: missing {before}, before {at(f, n)}")


def _check_head(base: Path, head: tuple[int, str] | None, head_line: str | None, last: int,
                last_at: tuple[Path, int] | None, notes: list[str]) -> Problem | None:  # fmt: skip
    """The head file catches an edited or removed last line (no later line links to it)."""
    name = head_path(base).name
    if head is None:
        notes.append(f"no readable {name}: the last line is checked by nothing after it")
        return None
    seq, h = head
    if seq > last:
        gone = f"record seq {seq}" if seq == last + 1 else f"records seq {last + 1}-{seq}"
        f, n = (last_at[0].name, last_at[1] + 1) if last_at else (base.name, 1)
        return Problem("removed", f, n, last + 1, f"{gone} removed from the end of the log ({name} says the "
                       f"last record is seq {seq})")  # fmt: skip
    if head_line is not None and head_line != h and last_at is not None:
        if seq == last:
            return Problem("changed", last_at[0].name, last_at[1], seq,
                           f"{last_at[0].name} line {last_at[1]} was changed: it no longer matches the hash in {name}")
        notes.append(f"{name} names seq {seq} with another hash; the lines after it link correctly")
    if seq < last:  # a writer died between its line and the head: the head lags, harmless
        notes.append(f"{name} lags the log (seq {seq} < {last})")
    return None
