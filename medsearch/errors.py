"""One error hierarchy for the whole library, and one vocabulary of error codes for both shells.

Every error carries a message that names the input and a ``hint`` with the next step. Each class
has a stable machine-readable ``code`` (``not_found``, ``invalid_input``, ...) and the HTTP status
the API answers with. The shells translate these once at their boundary (CLI: a red line, or a JSON
``{"error": {code, message, hint}}`` with ``--json``, and exit code 2; API: the same JSON body with
``http_status``), so a client sees the same code from either shell.
"""

from __future__ import annotations

INTERNAL = "internal"  # an unexpected failure; the details stay in the server log


class MedsearchError(Exception):
    """Base class. ``hint`` says what the user can do about it."""

    http_status = 400
    code = "error"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} - {self.hint}" if self.hint else self.message

    def to_dict(self) -> dict[str, str | None]:
        """The public error body: code, message and hint."""
        return {"code": self.code, "message": self.message, "hint": self.hint}


class InvalidInput(MedsearchError):
    """A file, record, argument or request field that cannot be used as given."""

    code = "invalid_input"


class NotSupportedByModel(InvalidInput):
    """A well-formed request the loaded model cannot serve (e.g. text -> image without a shared space)."""

    http_status = 409
    code = "not_supported_by_model"


class InvalidImage(InvalidInput):
    """An image that cannot be decoded (corrupt, truncated, not an image, no pixels)."""

    http_status = 415
    code = "invalid_image"


class ImageTooLarge(InvalidImage):
    """An upload or image larger than the configured byte or pixel limit."""

    http_status = 413
    code = "too_large"


class NotFound(MedsearchError):
    """A case, image, file or route that does not exist."""

    http_status = 404
    code = "not_found"


class Unauthorized(MedsearchError):
    """No API key where one is required, or a key that is unknown, mistyped or revoked."""

    http_status = 401
    code = "unauthorized"


class Forbidden(MedsearchError):
    """A valid key whose scope does not allow the operation."""

    http_status = 403
    code = "forbidden"


class RateLimited(MedsearchError):
    """Too many requests from one caller; ``retry_after`` seconds until the next is allowed."""

    http_status = 429
    code = "rate_limited"

    def __init__(self, message: str, hint: str | None = None, *, retry_after: float = 1.0) -> None:
        super().__init__(message, hint)
        self.retry_after = retry_after


class NotInstalled(MedsearchError):
    """A feature whose optional part is not installed in this environment."""

    http_status = 501
    code = "not_installed"


class ModelNotAvailable(MedsearchError):
    """Weights or a model package that is not installed / not in the local cache."""

    http_status = 503
    code = "model_unavailable"


class IndexMismatch(MedsearchError):
    """An index built by another model, dimension or format than the one asked for."""

    http_status = 409
    code = "index_mismatch"


class IndexNotBuilt(MedsearchError):
    """A search before ``medsearch index`` has built the index it needs."""

    http_status = 409
    code = "index_not_built"


class IndexInconsistent(MedsearchError):
    """Catalog, stored vectors and FAISS index disagree; ``medsearch check --repair`` fixes it."""

    http_status = 409
    code = "index_inconsistent"


class CatalogError(MedsearchError):
    """The catalog file is unreadable, from a newer version, or otherwise unusable."""

    http_status = 500
    code = "catalog_error"


class StorageError(MedsearchError):
    """A write that failed for lack of space or an I/O error; what was there before is kept."""

    http_status = 507
    code = "storage_error"


class GenerationError(MedsearchError):
    """A draft generator failed: a malformed completion, or a draft with no valid citation."""

    http_status = 502
    code = "generation_failed"


class LLMUnavailable(GenerationError):
    """An LLM endpoint that cannot be reached, times out, or refuses the request."""

    http_status = 503
    code = "llm_unavailable"


class BackupCorrupt(InvalidInput):
    """A backup whose manifest or files do not match their checksums: it is not restored."""

    http_status = 422
    code = "backup_corrupt"


class RemoteUnavailable(MedsearchError):
    """A PACS or DICOMweb server that cannot be reached, times out, or answers with an error."""

    http_status = 502
    code = "remote_unavailable"


def error_codes() -> dict[str, tuple[int, str]]:
    """Every error code with its HTTP status and meaning (the vocabulary both shells use)."""
    out: dict[str, tuple[int, str]] = {}
    todo: list[type[MedsearchError]] = [MedsearchError]
    while todo:
        cls = todo.pop(0)
        out.setdefault(cls.code, (cls.http_status, (cls.__doc__ or "").strip().splitlines()[0]))
        todo.extend(cls.__subclasses__())
    out[INTERNAL] = (500, "An unexpected server error; the server log has the details under the request id.")
    return out
