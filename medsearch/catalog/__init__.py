"""The catalog package: the only place with SQL.

``schema`` holds the tables and filter columns; ``core`` the :class:`Catalog` with its named queries.
"""

from .core import Catalog, blobs_to_matrix, content_hash, now
from .schema import FILTER_COLUMNS, SCHEMA_VERSION

__all__ = ["FILTER_COLUMNS", "SCHEMA_VERSION", "Catalog", "blobs_to_matrix", "content_hash", "now"]
