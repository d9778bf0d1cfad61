"""Domain exceptions of the store, shared by every layer.

Not-found is a value (`None`), not an exception: these are for failures. Each layer
maps them in exactly one place: the gRPC servicer to status codes
(`tvix_store.remote.status`), the CLI to exit codes (`tvix_store.cli`), the FUSE
adapter to errno (`tvix_fuse.errors`).
"""

from __future__ import annotations


class StoreError(Exception):
    """The store failed to do what was asked (I/O error, bug, corrupt data...).

    gRPC: INTERNAL. CLI: exit 1. FUSE: EIO.
    """


class ValidationError(StoreError, ValueError):
    """Input is malformed or violates a rule of PROTOCOL.md.

    gRPC: INVALID_ARGUMENT. CLI: exit 1 (or 2 when it is a command-line value). FUSE: EIO/ENOENT.
    """


class NotFoundError(StoreError):
    """Something that had to be present is absent (e.g. a blob a NAR needs).

    Used where absence is a failure of the operation, not the answer to a look-up.
    gRPC: NOT_FOUND. CLI: exit 1. FUSE: EIO (a hole in the tree).
    """


class IntegrityError(StoreError):
    """Bytes did not hash to the digest they were fetched by: nothing of them is returned.

    gRPC: DATA_LOSS / INTERNAL. CLI: exit 1. FUSE: EIO (logged with the digest).
    """


class UnavailableError(StoreError):
    """A remote store did not answer (down, stalled past its deadline, unreachable).

    gRPC: UNAVAILABLE / DEADLINE_EXCEEDED. CLI: exit 1. FUSE: EIO.
    """


class ConflictError(StoreError):
    """A write would change what the store already holds under that name (a store path that
    exists with other content): refused, the existing object stays.

    gRPC: ALREADY_EXISTS. CLI: exit 1.
    """


class PreconditionError(StoreError):
    """A write needs something the store lacks (a blob or Directory that a Directory or
    PathInfo references): refused until it has been uploaded.

    gRPC: FAILED_PRECONDITION. CLI: exit 1.
    """


class ResourceExhaustedError(StoreError):
    """The store ran out of room (disk full) or a request exceeded a configured limit
    (message count or size): refused, nothing partial stored.

    gRPC: RESOURCE_EXHAUSTED. CLI: exit 1. FUSE: ENOSPC where it applies, else EIO.
    """


class UnrepresentableError(StoreError):
    """The answer exists but the protocol generation asked in cannot express it (a name or
    target that is not UTF-8, a size of 2^32 or more, for a `tvix.store.v1` (2022) peer):
    refused instead of sent truncated or unparsable; a newer generation can carry it.

    gRPC: FAILED_PRECONDITION. CLI: exit 1.
    """


class UnsupportedError(StoreError):
    """The request asks for something this service does not do (a protocol generation's own
    answer for a request it does not implement, a listing of a store that cannot list).

    gRPC: UNIMPLEMENTED. CLI: exit 1.
    """


class AccessDeniedError(StoreError):
    """A remote refused the call: no valid credentials, or a read-only token asked to write.

    gRPC: UNAUTHENTICATED / PERMISSION_DENIED (HTTP 401 / 403). CLI: exit 1.
    """
