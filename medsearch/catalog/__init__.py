"""The catalog package: the only place with SQL.

``schema`` holds the tables and filter columns; ``core`` the :class:`Catalog` (open, migrate, writes)
built from ``reads`` (typed rows) and ``embeddings`` (stored vectors, dirty-index marker); ``rows`` the
frozen row records the named queries return.
"""

from .core import Catalog, content_hash
from .embeddings import SPACES, blobs_to_matrix
from .rows import CaseRow, ImageRow, LabelRow, StoredFields, TextRow
from .schema import FILTER_COLUMNS, SCHEMA_VERSION
from .util import now

__all__ = [
    "FILTER_COLUMNS", "SCHEMA_VERSION", "SPACES", "CaseRow", "Catalog", "ImageRow", "LabelRow", "StoredFields",
    "TextRow", "blobs_to_matrix", "content_hash", "now",
]  # fmt: skip
