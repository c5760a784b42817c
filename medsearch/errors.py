"""One error hierarchy for the whole library.

Every error carries a message that names the input and a ``hint`` with the next step.
The shells translate these once at their boundary (CLI: a red line and exit code 2;
API: a JSON body with the right 4xx code).
"""

from __future__ import annotations


class MedsearchError(Exception):
    """Base class. ``hint`` says what the user can do about it."""

    http_status = 400

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} - {self.hint}" if self.hint else self.message


class InvalidInput(MedsearchError):
    """A file, record or argument that cannot be used as given."""


class InvalidImage(InvalidInput):
    """An image that cannot be decoded (corrupt, truncated, not an image, no pixels)."""

    http_status = 415


class ImageTooLarge(InvalidImage):
    """An image whose declared size exceeds the configured pixel limit."""

    http_status = 413


class NotFound(MedsearchError):
    """A case, image or file that does not exist."""

    http_status = 404


class ModelNotAvailable(MedsearchError):
    """Weights or a model package that is not installed / not in the local cache."""

    http_status = 503


class IndexMismatch(MedsearchError):
    """An index built by another model, dimension or format than the one asked for."""

    http_status = 409


class IndexNotBuilt(MedsearchError):
    """A search before ``medsearch index`` has built the index it needs."""

    http_status = 409


class IndexInconsistent(MedsearchError):
    """Catalog, stored vectors and FAISS index disagree; ``medsearch check --repair`` fixes it."""

    http_status = 409


class CatalogError(MedsearchError):
    """The catalog file is unreadable, from a newer version, or otherwise unusable."""

    http_status = 500


class StorageError(MedsearchError):
    """A write that failed for lack of space or an I/O error; what was there before is kept."""

    http_status = 507


class GenerationError(MedsearchError):
    """A draft generator failed: a malformed completion, or a draft with no valid citation."""

    http_status = 502


class LLMUnavailable(GenerationError):
    """An LLM endpoint that cannot be reached, times out, or refuses the request."""

    http_status = 503


class RemoteUnavailable(MedsearchError):
    """A PACS or DICOMweb server that cannot be reached, times out, or answers with an error."""

    http_status = 502
