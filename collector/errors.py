"""The collector's exceptions and their one translation to gRPC status codes.

Everything that rejects input raises one of the small classes below, with a message that says
what was wrong and what was expected. `status_of` is the only place that turns an exception
into a `grpc.StatusCode`; the servicer and the auth interceptor both go through it, so a client
sees the same code for the same mistake wherever it is caught.

`permanent` says whether a client may retry: resending the same frames after a bad token,
missing operator rights or a malformed frame can never succeed, so the Error frame the servicer
sends before the status says permanent, and the client stops instead of reconnecting. A bound
that frees up (a rank too far ahead, the byte budget) is not permanent; one that a resend can
never get under (too many schemas or metrics) is: `ResourceExhausted(..., permanent=True)`.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from store.base import InvalidInput as StoreInvalidInput


class CollectorError(Exception):
    """Base class: a frame or call the collector refuses; `code` is the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    permanent: bool = False

    def __init__(self, message: str = "", *, permanent: bool | None = None) -> None:
        super().__init__(message)
        if permanent is not None:
            self.permanent = permanent


class InvalidArgument(CollectorError, ValueError):
    """Malformed or contradictory input: unknown schema id, chunk outside its schema, byte
    length not a multiple of 4, rank >= world_size, bad run name, REDUCE_UNSPECIFIED, a world
    size that differs from the live run's, a stream that does not start with Hello, ..."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    permanent = True


class ResourceExhausted(CollectorError):
    """A bound was hit: a rank too far ahead of the barrier, too many pending steps, bytes,
    runs, schemas or metrics. The client may retry later (unless permanent=True: schemas and
    metrics are never unregistered); memory stays bounded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(CollectorError):
    """Missing or wrong `authorization: Bearer <token>` metadata."""

    code = grpc.StatusCode.UNAUTHENTICATED
    permanent = True


class PermissionDenied(CollectorError):
    """A valid token without the right: a clip command needs the operator token."""

    code = grpc.StatusCode.PERMISSION_DENIED
    permanent = True


class Unavailable(CollectorError):
    """Nothing more can be made durable now: the collector is shutting down, or the store is
    away and the spool full. Nothing of the refused frame is acknowledged; the client should
    reconnect with backoff (to this collector or the next) and resend what is not acked."""

    code = grpc.StatusCode.UNAVAILABLE


class AlreadyExists(CollectorError):
    """A Hello for a (run, rank) that another client is streaming right now: a second job
    started with the same run name. Permanent for that client: pick another run name."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(CollectorError):
    """The stream was superseded by a newer stream of the same client (same session)."""

    code = grpc.StatusCode.ABORTED


class FailedPrecondition(CollectorError):
    """The request cannot be served by this collector as it is configured (a clip command at
    a tier collector, whose clip table is the coordinator's)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    permanent = True


REJECTED = (CollectorError, DecodeError)  # bad input, as opposed to a collector bug


def is_permanent(exc: BaseException) -> bool:
    """Whether the client must not retry after `exc` (see the module docstring)."""
    if isinstance(exc, CollectorError):
        return exc.permanent
    return isinstance(exc, (StoreInvalidInput, DecodeError))  # INVALID_ARGUMENT, as above


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, message) for any exception; unknown ones are INTERNAL and say so."""
    if isinstance(exc, CollectorError):
        return exc.code, str(exc)
    if isinstance(exc, StoreInvalidInput):  # a store-side validation of our input
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, DecodeError):  # bytes that are not a ClientFrame
        return grpc.StatusCode.INVALID_ARGUMENT, f"undecodable frame: {exc}"
    return grpc.StatusCode.INTERNAL, f"internal collector error: {type(exc).__name__}: {exc}"
