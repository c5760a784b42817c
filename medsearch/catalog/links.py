"""The optional link back to the hospital's viewer: pseudonymous study key -> original Study Instance UID.

Off by default. In-hospital deployments that want a result to open the study in their viewer turn
it on at ingest (``--link-back``); the mapping then lives in ``HOME/private/links.db``, a file of its
own beside the catalog, never inside it. It is re-identifying by design, so:

- only admin API keys ever see what it yields (a viewer URL built from ``--viewer-url``);
- ``medsearch backup`` leaves it out unless ``--with-links`` is given; exports never include it;
- it is never logged; ``medsearch audit-phi`` reports whether it exists and how many studies it maps;
- ``medsearch remove`` deletes the entries of what it removes.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS links (
    source TEXT NOT NULL,
    study_key TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    PRIMARY KEY (source, study_key)
) WITHOUT ROWID;
"""


def links_path(home: str | Path) -> Path:
    return Path(home) / "private" / "links.db"


class LinkStore:
    """The pseudonym -> Study Instance UID map of one home (file mode 0600, folder 0700)."""

    def __init__(self, path: Path, con: sqlite3.Connection) -> None:
        self.path = path
        self.con = con

    @classmethod
    def open(cls, home: str | Path, *, create: bool = False) -> LinkStore | None:
        """The home's link store; None when it does not exist and ``create`` is False."""
        path = links_path(home)
        if not path.exists() and not create:
            return None
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        con = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(_SCHEMA)
        os.chmod(path, 0o600)
        return cls(path, con)

    def put(self, source: str, study_key: str, study_uid: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO links (source, study_key, study_uid) VALUES (?, ?, ?)",
                         [source, study_key, study_uid])  # fmt: skip

    def put_many(self, rows: Iterable[tuple[str, str, str]]) -> None:
        with self.con:
            self.con.executemany("INSERT OR REPLACE INTO links (source, study_key, study_uid) VALUES (?, ?, ?)",
                                 list(rows))  # fmt: skip

    def uid(self, source: str, study_key: str) -> str | None:
        row = self.con.execute("SELECT study_uid FROM links WHERE source = ? AND study_key = ?",
                               [source, study_key]).fetchone()  # fmt: skip
        return row[0] if row else None

    def remove(self, source: str, study_keys: Iterable[str]) -> int:
        keys = list(study_keys)
        with self.con:
            n = 0
            for k in keys:
                n += self.con.execute("DELETE FROM links WHERE source = ? AND study_key = ?", [source, k]).rowcount
        return n

    def count(self) -> int:
        return int(self.con.execute("SELECT count(*) FROM links").fetchone()[0])

    def close(self) -> None:
        self.con.close()


def viewer_url(template: str, study_uid: str) -> str:
    """``template`` with ``{uid}`` replaced by the Study Instance UID (URL-quoted)."""
    from urllib.parse import quote

    return template.replace("{uid}", quote(study_uid, safe=""))


def link_status(home: str | Path) -> dict[str, object]:
    """What ``audit-phi`` reports: whether the link file exists, where, and how many studies it maps."""
    store = LinkStore.open(home)
    if store is None:
        return {"exists": False}
    try:
        return {"exists": True, "path": str(store.path), "studies": store.count()}
    finally:
        store.close()
