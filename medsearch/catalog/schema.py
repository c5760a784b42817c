"""The catalog's schema: tables, indexes, migrations and the columns a search filter may compare.

Versions: 1 = cases, images, texts, labels, vectors, ingest_log. 2 = a ``series`` level (one row per
DICOM series of a study: modality, body part, plane, slice count, thickness, position range, how its
slices were ordered, window) and three image columns (``series_id``, ``slice_index``, ``position``);
image ``status`` gains ``deferred``: a catalogued slice the embed stage skips (``--slices N``).
``migrate`` brings any older catalog up to ``SCHEMA_VERSION`` in one transaction.
"""

import sqlite3

SCHEMA_VERSION = 2

# Image status: ok (embed and search it), failed (decode failed while embedding), deferred
# (a catalogued slice left out by slice selection; `ingest --slices all` makes it ok).
IMAGE_STATUSES = ("ok", "failed", "deferred")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    split TEXT,
    patient_key TEXT,
    title TEXT,
    diagnosis TEXT,
    category TEXT,
    sections TEXT NOT NULL DEFAULT '{}',
    labels TEXT NOT NULL DEFAULT '{}',
    meta TEXT NOT NULL DEFAULT '{}',
    content_hash TEXT NOT NULL,
    ingested_at TEXT NOT NULL,
    UNIQUE (source, key)
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    case_id INTEGER NOT NULL REFERENCES cases(id),
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    path TEXT NOT NULL,
    frame INTEGER,
    sha256 TEXT NOT NULL,
    bytes INTEGER,
    width INTEGER,
    height INTEGER,
    split TEXT,
    modality_type TEXT,
    modality TEXT,
    plane TEXT,
    body_region TEXT,
    location TEXT,
    laterality TEXT,
    study_date TEXT,
    caption TEXT,
    labels TEXT NOT NULL DEFAULT '{}',
    meta TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'ok',
    error TEXT,
    ingested_at TEXT NOT NULL,
    series_id INTEGER REFERENCES series(id),
    slice_index INTEGER,
    position REAL,
    UNIQUE (source, key)
);
CREATE INDEX IF NOT EXISTS images_case ON images(case_id);
CREATE INDEX IF NOT EXISTS images_sha ON images(sha256);
-- search filters compare lower(column) (case-insensitive): one expression index each, so a selective filter
-- reads its matching rows instead of scanning every image (1.8 s -> 37 ms for a 1% filter at 1M images: benchmarks/filter_lookup.py)
CREATE INDEX IF NOT EXISTS images_f_modality ON images(lower(modality_type), status);
CREATE INDEX IF NOT EXISTS images_f_region ON images(lower(body_region), status);
CREATE INDEX IF NOT EXISTS images_f_split ON images(lower(split), status);
CREATE INDEX IF NOT EXISTS images_f_source ON images(lower(source), status);
CREATE INDEX IF NOT EXISTS images_f_plane ON images(lower(plane), status);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    case_id INTEGER NOT NULL REFERENCES cases(id),
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    number INTEGER,
    modality TEXT,
    body_part TEXT,
    body_region TEXT,
    plane TEXT,
    orientation TEXT,
    slice_count INTEGER NOT NULL,
    thickness REAL,
    spacing REAL,
    position_min REAL,
    position_max REAL,
    ordered_by TEXT NOT NULL,
    order_note TEXT,
    window_center REAL,
    window_width REAL,
    preset TEXT,
    content_hash TEXT NOT NULL,
    ingested_at TEXT NOT NULL,
    UNIQUE (source, key)
);
CREATE INDEX IF NOT EXISTS series_case ON series(case_id);
CREATE TABLE IF NOT EXISTS texts (
    id INTEGER PRIMARY KEY,
    case_id INTEGER NOT NULL REFERENCES cases(id),
    image_id INTEGER REFERENCES images(id),
    section TEXT NOT NULL,
    kind TEXT NOT NULL,
    seq INTEGER NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS texts_case ON texts(case_id);
CREATE INDEX IF NOT EXISTS texts_image ON texts(image_id);
CREATE TABLE IF NOT EXISTS labels (
    case_id INTEGER NOT NULL REFERENCES cases(id),
    image_id INTEGER REFERENCES images(id),
    name TEXT NOT NULL,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_case ON labels(case_id);
CREATE INDEX IF NOT EXISTS labels_nv ON labels(name, value);
CREATE TABLE IF NOT EXISTS vectors (
    model TEXT NOT NULL,
    space TEXT NOT NULL,
    item_id INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    vec BLOB NOT NULL,
    PRIMARY KEY (model, space, item_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ingest_log (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    path TEXT NOT NULL,
    reader TEXT NOT NULL,
    status TEXT NOT NULL,
    cases_added INTEGER DEFAULT 0,
    cases_updated INTEGER DEFAULT 0,
    images_added INTEGER DEFAULT 0,
    images_updated INTEGER DEFAULT 0,
    unchanged INTEGER DEFAULT 0,
    skipped INTEGER DEFAULT 0,
    skipped_items TEXT DEFAULT '[]'
);
"""

# Indexes on columns that version 1 did not have: created after the columns are added.
_V2_INDEXES = "CREATE INDEX IF NOT EXISTS images_series ON images(series_id, slice_index);"
_V2_IMAGE_COLUMNS = (("series_id", "INTEGER REFERENCES series(id)"), ("slice_index", "INTEGER"), ("position", "REAL"))


def migrate(conn: sqlite3.Connection) -> int | None:
    """Create missing tables and bring an older catalog up to ``SCHEMA_VERSION``.

    Returns the version found before (None for a new catalog). A catalog newer than this code is
    left untouched (the caller refuses it). Idempotent: a second call changes nothing.
    """
    conn.executescript("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row else None
    if version is not None and version > SCHEMA_VERSION:
        return version
    images_exist = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'images'").fetchone()
    if images_exist:  # an older catalog: add the columns before SCHEMA's indexes refer to them
        have = {r[1] for r in conn.execute("PRAGMA table_info(images)")}
        missing = [(c, t) for c, t in _V2_IMAGE_COLUMNS if c not in have]
        if missing or (version is not None and version < SCHEMA_VERSION):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for col, typ in missing:
                    conn.execute(f"ALTER TABLE images ADD COLUMN {col} {typ}")
                if version is not None:
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    conn.executescript(SCHEMA + _V2_INDEXES)
    return version


# Columns a search filter may use, mapped to the images column they compare.
FILTER_COLUMNS = {
    "modality": "modality_type",
    "body_region": "body_region",
    "split": "split",
    "source": "source",
    "plane": "plane",
}
