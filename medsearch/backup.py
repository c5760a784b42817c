"""Online backup and restore of a medsearch home.

``backup(home, dest)`` copies, while the home is served and written:

    catalog.db          through SQLite's online backup API: one point in time (catalog.snapshot)
    indexes/<model>/    the vector index files + manifests and the BM25 generation of the
                        generation being served, copied under the folder's save lock (so no
                        `medsearch index` swaps a file halfway through the copy)
    models/             trained weights (written by rename, so each file is whole)
    images/             de-identified display images of PACS studies (written by rename)
    private/links.db    the link back (pseudonym -> Study Instance UID), only with ``with_links``
    api_keys.json       the hashed API keys
    audit.log*          the audit log, its rotated files and head (copied under the log's lock)
    backup.json         this backup's manifest: every file's size, sha256 and mode, the
                        generations, the check report; its own checksum over all of that

The copied indexes must agree with the catalog copy. When a writer was between embedding and
indexing at that moment they do not; the derived indexes of the copy are then rebuilt from its
stored vectors (the catalog is the truth; `repaired` in the manifest says so), so `medsearch
check` passes on every backup. Source image files are not in the home and not copied.

The backup is built in a hidden folder beside ``dest`` and renamed into place when complete: a
full disk or a kill leaves no half backup, and the home is never written. ``restore(src, home)``
refuses a backup whose manifest or any file fails its checksum, restores into a hidden folder
beside ``home``, checks it, then renames it into place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .catalog.snapshot import snapshot
from .config import Paths
from .errors import BackupCorrupt, InvalidInput, MedsearchError, NotFound, StorageError
from .stores.faiss import save_lock

FORMAT = "medsearch-backup"
FORMAT_VERSION = 1
MANIFEST = "backup.json"
_BLOCK = 1 << 20


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _copy(src: Path, dst: Path, *, upto: int | None = None) -> tuple[str, int]:
    """Copy ``src`` (its first ``upto`` bytes) to the new file ``dst`` (mode 0600), fsynced; (sha256, size)."""
    h, size = hashlib.sha256(), 0
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(src, "rb") as fi, os.fdopen(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fo:
        while upto is None or size < upto:
            chunk = fi.read(_BLOCK if upto is None else min(_BLOCK, upto - size))
            if not chunk:
                break
            h.update(chunk)
            fo.write(chunk)
            size += len(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest(), size


def _sha256(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _is_temp(name: str) -> bool:
    return name.startswith(".")  # .lock, .<name>.*.tmp of a save in flight


def _walk(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` (no hidden files or folders, no links), sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_temp(d))
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if not _is_temp(f) and p.is_file() and not p.is_symlink():
                yield p


def _manifest_checksum(man: dict[str, Any]) -> str:
    body = {k: v for k, v in man.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _storage_error(e: OSError, what: str, hint: str) -> MedsearchError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
        return StorageError(f"{what}: {e.strerror or e}", hint=hint)
    return StorageError(f"{what}: {e}", hint=hint)


@contextmanager
def _staging(stage: Path, what: str, hint: str) -> Iterator[Path]:
    """A private folder that the block fills and publishes; on any failure it is removed, and an
    OSError (a full disk) becomes a StorageError saying ``what`` and ``hint``."""
    stage.mkdir(mode=0o700)
    try:
        yield stage
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise _storage_error(e, what, hint) from e
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _publish(stage: Path, target: Path) -> None:
    """Rename the finished ``stage`` onto ``target`` (absent or an empty folder) and make it durable."""
    if target.exists():
        target.rmdir()
    os.rename(stage, target)
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- backup
def backup(home: str | Path, dest: str | Path, *, audit: bool = True, with_links: bool = False) -> dict[str, Any]:
    """Take a consistent backup of ``home`` into the new folder ``dest``; returns its manifest summary.

    Safe while the home is served and written. ``dest`` must not exist (or be an empty folder).
    Raises StorageError on a full disk (nothing is left at ``dest``; the home is untouched).
    """
    t0 = time.perf_counter()
    paths = Paths(Path(home).expanduser().resolve())
    dest = Path(dest).expanduser().absolute()
    if not paths.catalog.is_file():
        raise NotFound(f"no catalog in {paths.home}", hint="point --home at a medsearch home")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidInput(f"the backup destination {dest} already exists and is not an empty folder",
                           hint="give a new folder, e.g. one named by today's date")  # fmt: skip
    if dest == paths.home or paths.home in dest.parents:
        raise InvalidInput(f"the backup destination {dest} is inside the home {paths.home}",
                           hint="back up to another folder, ideally another disk")  # fmt: skip
    dest.parent.mkdir(parents=True, exist_ok=True)
    for old in dest.parent.glob(f".{dest.name}.partial-*"):  # left by a killed backup to the same folder
        shutil.rmtree(old, ignore_errors=True)
    stage = dest.parent / f".{dest.name}.partial-{secrets.token_hex(4)}"
    with _staging(stage, f"could not write the backup {dest}",
                  "free disk space at the destination and run the backup again; the home was not changed"):  # fmt: skip
        man = _build(paths, stage, audit, with_links)
        man["seconds"] = round(time.perf_counter() - t0, 3)
        man["checksum"] = _manifest_checksum(man)
        with open(stage / MANIFEST, "w") as f:
            json.dump(man, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(stage)
        _publish(stage, dest)
    return summary(man, dest)


def _build(paths: Paths, stage: Path, audit: bool, with_links: bool = False) -> dict[str, Any]:
    files: dict[str, dict[str, Any]] = {}

    def record(rel: str, src: Path, sha: str, size: int) -> None:
        files[rel] = {"sha256": sha, "size": size, "mode": src.stat().st_mode & 0o777}

    model_dirs = sorted(d for d in paths.indexes.iterdir() if d.is_dir()) if paths.indexes.is_dir() else []
    generations: dict[str, dict[str, int]] = {}
    t = time.perf_counter()
    with ExitStack() as locks:
        for d in model_dirs:  # no index save can swap a file while these are held (readers are not blocked)
            locks.enter_context(save_lock(d))
        for d in model_dirs:
            generations[d.name] = _copy_generation(d, stage / "indexes" / d.name, f"indexes/{d.name}", record)
        index_seconds = time.perf_counter() - t
        cat = snapshot(paths.catalog, stage / "catalog.db")
    # models, and the de-identified display images of PACS studies (each written by rename before the
    # catalog names it, so every image the snapshot refers to is whole and present)
    for sub in (paths.models, paths.home / "images"):
        if sub.is_dir():
            for p in _walk(sub):
                rel = p.relative_to(paths.home).as_posix()
                record(rel, p, *_copy(p, stage / rel))
    links = paths.home / "private" / "links.db"
    if with_links and links.is_file():  # re-identifying: only when asked (--with-links)
        (stage / "private").mkdir(mode=0o700, exist_ok=True)
        snapshot(links, stage / "private" / "links.db")
        record("private/links.db", links, *_sha256(stage / "private" / "links.db"))
    keys = paths.home / "api_keys.json"
    if keys.is_file():
        record("api_keys.json", keys, *_copy(keys, stage / "api_keys.json"))
    audit_files = _copy_audit(paths.home / "audit.log", stage, record) if audit else []
    check = _make_consistent(stage)
    sha, size = _sha256(stage / "catalog.db")  # after any repair wrote to it
    files["catalog.db"] = {"sha256": sha, "size": size, "mode": paths.catalog.stat().st_mode & 0o777}
    for rel in check["rebuilt_files"]:  # indexes rebuilt in the copy: hash what is there now
        p = stage / rel
        if p.is_file():
            files[rel] = {"sha256": _sha256(p)[0], "size": p.stat().st_size, "mode": 0o644}
        else:
            files.pop(rel, None)
    for p in _walk(stage):  # anything the repair added (a new BM25 generation folder)
        rel = p.relative_to(stage).as_posix()
        if rel not in files:
            files[rel] = {"sha256": _sha256(p)[0], "size": p.stat().st_size, "mode": 0o644}
    for rel in [r for r in files if not (stage / r).is_file()]:  # and what it removed (an old BM25 folder)
        files.pop(rel)
    from . import __version__

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "medsearch": __version__, "created_at": _now(),
        "home": str(paths.home), "catalog": {**cat, "sha256": sha}, "generations": generations,
        "index_copy_seconds": round(index_seconds, 3), "audit_files": audit_files,
        "consistent_as_copied": not check["repaired"], "repaired": check["repaired"], "check_ok": check["ok"],
        "files": dict(sorted(files.items())), "bytes": sum(f["size"] for f in files.values()),
    }  # fmt: skip


def _copy_generation(src: Path, dst: Path, rel: str, record: Any) -> dict[str, int]:
    """The served generation of one model folder: index files + manifests, BM25 manifest + its folder."""
    gens: dict[str, int] = {}
    for p in sorted(src.iterdir()):
        if _is_temp(p.name) or not p.is_file():
            continue
        record(f"{rel}/{p.name}", p, *_copy(p, dst / p.name))
        if p.suffix == ".json":
            try:
                gen = json.loads(p.read_text()).get("generation")
                if isinstance(gen, int):
                    gens["bm25" if p.name == "bm25.json" else p.stem] = gen
            except (OSError, ValueError, AttributeError):
                pass  # an unreadable manifest is copied as it is; check reports it
    bm25 = src / "bm25.json"
    folders = [p for p in src.iterdir() if p.is_dir() and p.name.endswith(".shards")]
    if bm25.is_file():
        try:
            folder = json.loads(bm25.read_text()).get("folder")
        except (OSError, ValueError, AttributeError):
            folder = None
        if isinstance(folder, str) and (src / folder).is_dir() and "/" not in folder:
            folders.append(src / folder)
    for folder in folders:
        for p in _walk(folder):
            r = p.relative_to(src).as_posix()
            record(f"{rel}/{r}", p, *_copy(p, dst / r))
    return gens


def _copy_audit(log: Path, stage: Path, record: Any) -> list[str]:
    """The audit log: the head and the current file under the writers' lock, then the rotated files."""
    from .audit import head_path, locked, log_files

    if not log.parent.is_dir():
        return []
    copied = []
    with locked(log):
        files = log_files(log)
        for p in (head_path(log), log):
            if p.is_file():
                record(p.name, p, *_copy(p, stage / p.name))
                copied.append(p.name)
    for p in files:  # rotated files are never written again
        if p != log:
            record(p.name, p, *_copy(p, stage / p.name))
            copied.append(p.name)
    return sorted(copied)


def _make_consistent(stage: Path) -> dict[str, Any]:
    """Check the copy; rebuild its derived indexes from its own stored vectors when they disagree."""
    from .consistency import check_home

    cat = Catalog.open(stage / "catalog.db", create=False)
    try:
        before = {p.relative_to(stage).as_posix(): p.stat().st_mtime_ns for p in _walk(stage / "indexes")} \
            if (stage / "indexes").is_dir() else {}  # fmt: skip
        rep = check_home(cat, Paths(stage))
        repaired: list[str] = []
        if rep["problems"]:
            rep = check_home(cat, Paths(stage), repair=True)
            repaired = [f"{p} (fixed in the copy: {', '.join(rep['repaired'])})" for p in rep["problems"]]
            if not rep["ok"]:
                raise StorageError(f"the backup copy could not be made consistent: {'; '.join(rep['problems'])}",
                                   hint="run `medsearch check --repair` on the home, then back up again")  # fmt: skip
        after = {p.relative_to(stage).as_posix(): p.stat().st_mtime_ns for p in _walk(stage / "indexes")} \
            if (stage / "indexes").is_dir() else {}  # fmt: skip
    finally:
        cat.close()
    changed = sorted({r for r in before if after.get(r) != before[r]})
    return {"ok": rep["ok"], "repaired": repaired, "rebuilt_files": changed}


def summary(man: dict[str, Any], where: Path) -> dict[str, Any]:
    """What the shells print: where, how big, how long, which generations, whether repaired."""
    return {
        "backup": str(where), "created_at": man["created_at"], "files": len(man["files"]), "bytes": man["bytes"],
        "seconds": man.get("seconds"), "generations": man["generations"], "catalog_bytes": man["catalog"]["bytes"],
        "consistent_as_copied": man["consistent_as_copied"], "repaired": man["repaired"],
    }  # fmt: skip


# ---------------------------------------------------------------------- verify / restore
def read_manifest(src: Path) -> dict[str, Any]:
    """The manifest of the backup at ``src``, its own checksum verified (BackupCorrupt otherwise)."""
    mpath = Path(src) / MANIFEST
    if not Path(src).is_dir():
        raise NotFound(f"no backup at {src}", hint="give the folder that `medsearch backup DEST` wrote")
    try:
        man = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise BackupCorrupt(f"{src} has no {MANIFEST}: not a medsearch backup, or an incomplete one",
                            hint="restore another backup") from None  # fmt: skip
    except (OSError, ValueError) as e:
        raise BackupCorrupt(f"the manifest {mpath} is unreadable: {e}", hint="restore another backup") from e
    if not isinstance(man, dict) or man.get("format") != FORMAT or not isinstance(man.get("files"), dict):
        raise BackupCorrupt(f"{mpath} is not a medsearch backup manifest", hint="restore another backup")
    if man.get("format_version") != FORMAT_VERSION:
        raise BackupCorrupt(f"{src} is backup format {man.get('format_version')}, this medsearch reads "
                            f"{FORMAT_VERSION}", hint="restore it with the medsearch version that wrote it")  # fmt: skip
    if man.get("checksum") != _manifest_checksum(man):
        raise BackupCorrupt(f"the manifest {mpath} does not match its checksum (edited or damaged)",
                            hint="restore another backup")  # fmt: skip
    return man


def _safe_rel(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts and not any(_is_temp(x) for x in parts)


def verify_backup(src: str | Path, *, contents: bool = True) -> dict[str, Any]:
    """Check every file of a backup against its manifest; raises BackupCorrupt naming the first bad one.

    ``contents=False`` checks the manifest, names and sizes only (restore hashes while it copies).
    """
    src = Path(src)
    man = read_manifest(src)
    for rel, meta in man["files"].items():
        if not _safe_rel(rel):
            raise BackupCorrupt(f"the manifest of {src} names an unsafe path {rel!r}", hint="restore another backup")
        p = src / rel
        if not p.is_file():
            raise BackupCorrupt(f"{rel} is missing from the backup {src}", hint="restore another backup")
        if p.stat().st_size != meta["size"] or (contents and _sha256(p)[0] != meta["sha256"]):
            raise BackupCorrupt(f"{rel} in the backup {src} does not match its checksum (damaged or edited)",
                                hint="restore another backup")  # fmt: skip
    extra = [p.relative_to(src).as_posix() for p in _walk(src)]
    extra = [r for r in extra if r != MANIFEST and r not in man["files"]]
    if extra:
        raise BackupCorrupt(f"the backup {src} holds {extra[0]}, which its manifest does not list",
                            hint="restore another backup")  # fmt: skip
    return man


def restore(src: str | Path, home: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Restore the backup ``src`` into ``home`` (a new or empty folder; ``force`` moves an existing home aside).

    Every file is checked against the manifest before the home changes; the restored home must
    pass ``check``. Returns {home, files, bytes, seconds, moved_aside, check}.
    """
    from .consistency import check_home

    t0 = time.perf_counter()
    src = Path(src).expanduser().absolute()
    home = Path(home).expanduser().absolute()
    man = verify_backup(src, contents=False)  # names and sizes; every byte is hashed as it is copied
    occupied = home.exists() and (not home.is_dir() or any(home.iterdir()))
    if occupied and not force:
        raise InvalidInput(f"{home} is not empty; restoring would replace it",
                           hint="restore into a new folder, or pass --force to move the current home aside first")
    home.parent.mkdir(parents=True, exist_ok=True)
    stage = home.parent / f".{home.name}.restoring-{secrets.token_hex(4)}"
    with _staging(stage, f"could not restore into {home}",
                  "free disk space beside the home and run the restore again; the home was not changed"):  # fmt: skip
        for rel, meta in man["files"].items():
            sha, _ = _copy(src / rel, stage / rel)
            if sha != meta["sha256"]:
                raise BackupCorrupt(f"{rel} in the backup {src} does not match its checksum (damaged or edited)",
                                    hint="restore another backup")  # fmt: skip
            os.chmod(stage / rel, int(meta.get("mode", 0o600)) & 0o777)
        cat = Catalog.open(stage / "catalog.db", create=False)
        try:
            rep = check_home(cat, Paths(stage))
        finally:
            cat.close()
        if not rep["ok"]:
            raise BackupCorrupt(f"the restored copy of {src} fails `medsearch check`: {'; '.join(rep['problems'])}",
                                hint="restore another backup")  # fmt: skip
        os.chmod(stage, 0o755)
        aside = None
        if occupied:
            aside = home.with_name(f"{home.name}.before-restore-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
            os.rename(home, aside)
        _publish(stage, home)
    return {
        "home": str(home), "backup": str(src), "created_at": man["created_at"], "files": len(man["files"]),
        "bytes": man["bytes"], "seconds": round(time.perf_counter() - t0, 3),
        "moved_aside": str(aside) if aside else None, "check": {"ok": rep["ok"], "problems": rep["problems"]},
    }  # fmt: skip
