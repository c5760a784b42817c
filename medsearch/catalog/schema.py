"""The catalog's schema: tables, indexes and the columns a search filter may compare."""

SCHEMA_VERSION = 1

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
    UNIQUE (source, key)
);
CREATE INDEX IF NOT EXISTS images_case ON images(case_id);
CREATE INDEX IF NOT EXISTS images_sha ON images(sha256);
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

# Columns a search filter may use, mapped to the images column they compare.
FILTER_COLUMNS = {
    "modality": "modality_type",
    "body_region": "body_region",
    "split": "split",
    "source": "source",
    "plane": "plane",
}
