"""Errors the service answers with an HTTP status. They are EngineErrors, so code shared with the
CLI can raise them too; the app turns each into ``{"error": message, "status": code}``."""

from __future__ import annotations

from engine.errors import EngineError


class ServiceError(EngineError):
    """An error with the HTTP status it is answered with. ``field`` names the upload it concerns
    and ``reason`` is the bare cause (what ``engine query`` prints for an unreadable file)."""

    status = 400

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.field = field
        self.reason = reason


class BadRequest(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class NotFound(ServiceError):
    status = 404


class TooLarge(ServiceError):
    status = 413


class UnsupportedImage(ServiceError):
    status = 415


class Unprocessable(ServiceError):
    status = 422


class Unavailable(ServiceError):
    status = 503
