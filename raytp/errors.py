"""Typed errors shared by every layer.

Each error carries the HTTP status and OpenAI error ``type`` the ingress answers
with, so Python handle callers and HTTP clients see the same classification.
"""

from __future__ import annotations


class RaytpError(Exception):
    """Base class. ``status_code`` / ``error_type`` map to an OpenAI-style error body."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __reduce__(self):  # keep param/code when Ray pickles the error across processes
        return (_rebuild, (type(self), self.message, self.param, self.code))


def _rebuild(cls, message, param, code):
    return cls(message, param=param, code=code)


class InvalidRequestError(RaytpError):
    """The request is malformed or asks for something the model cannot do (HTTP 400)."""

    status_code = 400
    error_type = "invalid_request_error"


def check_token_ids(ids, vocab_size: int, param: str) -> None:
    """``InvalidRequestError`` naming ``param`` if any id is outside the vocabulary [0, vocab_size)."""
    if any(not 0 <= t < vocab_size for t in ids):
        raise InvalidRequestError(f"{param}: token ids must be in [0, {vocab_size})", param=param)


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this app does not serve (HTTP 404, as OpenAI answers)."""

    status_code = 404
    code = "model_not_found"

    def __init__(self, message: str, *, param: str | None = "model", code: str | None = "model_not_found"):
        super().__init__(message, param=param, code=code)


class ResponseNotFoundError(InvalidRequestError):
    """A Responses API id that is not (or no longer) stored (HTTP 404, as vLLM answers)."""

    status_code = 404

    def __init__(self, message: str, *, param: str | None = "response_id", code: str | None = "response_not_found"):
        super().__init__(message, param=param, code=code)


class PayloadTooLargeError(InvalidRequestError):
    """The HTTP request body is over ``max_request_body_bytes`` (HTTP 413)."""

    status_code = 413


class AuthenticationError(RaytpError):
    """Missing or wrong API key (HTTP 401)."""

    status_code = 401
    error_type = "authentication_error"


class EngineDeadError(RaytpError):
    """The TP gang failed (dead rank, collective timeout, worker exception).

    In-flight and new requests on this replica get this error (HTTP 503); the
    replica's health check fails so Serve replaces it with a fresh gang.
    """

    status_code = 503
    error_type = "service_unavailable"
    retry_after_s = 1  # a replacement gang is on its way, or another replica can serve


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the fix."""

    def __init__(self, field: str, message: str):
        super().__init__(f"raytp config field '{field}': {message}")
        self.field = field
        self.detail = message

    def __reduce__(self):  # rebuilt from its own arguments when Ray carries it out of a rank or replica
        return (type(self), (self.field, self.detail))


class QueueFullError(RaytpError):
    """The replica's waiting queue is full (HTTP 429 with Retry-After); retry later."""

    status_code = 429
    error_type = "rate_limit_exceeded"
    retry_after_s = 1


class ModelLoadingError(EngineDeadError):
    """No model replica has finished loading yet (HTTP 503 with Retry-After); retry shortly."""

    retry_after_s = 5

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "model_loading"):
        super().__init__(message, param=param, code=code)
