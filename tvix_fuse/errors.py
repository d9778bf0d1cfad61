"""The exceptions of the filesystem model and the ONE map from any exception to an errno.

The model (`tvix_fuse.model`) raises these and the store's domain exceptions
(`tvix_store.core.errors`); the pyfuse3 adapter (`tvix_fuse.ops`) turns whatever a model call
raised into `FUSEError(errno_for(exc))`. Nothing else maps errors. This module does not
import pyfuse3 (an errno is an int).
"""

from __future__ import annotations

import errno
import logging

from tvix_store.core.errors import IntegrityError, NotFoundError, StoreError, UnavailableError

log = logging.getLogger("tvix_fuse")


class FsError(Exception):
    """Base of the model's own errors (each maps to one errno below)."""


class NoEntry(FsError):
    """The name does not exist. `ttl`: how long the kernel may cache the absence
    (long inside immutable trees, short where a digest may arrive later, 0: not at all)."""

    def __init__(self, ttl: float = 0.0) -> None:
        super().__init__("no such entry")
        self.ttl = ttl


class NotADirectory(FsError):
    pass


class NoAttribute(FsError):
    pass


class ReadOnly(FsError):
    pass


class BadHandle(FsError):
    pass


class AttributeTooLarge(FsError):
    pass


class RequestTimeout(UnavailableError):
    """A request did not finish within the mount's per-request deadline (EIO)."""

    def __init__(self, deadline: float) -> None:
        super().__init__(f"request did not finish within {deadline:g} s")


_ERRNO: list[tuple[type[BaseException], int]] = [
    (NoEntry, errno.ENOENT),
    (NotADirectory, errno.ENOTDIR),
    (NoAttribute, errno.ENODATA),
    (ReadOnly, errno.EROFS),
    (BadHandle, errno.EBADF),
    (AttributeTooLarge, errno.ERANGE),
    # a referenced object the store lacks (a hole), corrupt bytes, a remote that does not
    # answer, any other store failure: the request fails, the mount goes on
    (StoreError, errno.EIO),
]


def errno_for(exc: BaseException) -> int:
    """The errno for an exception raised by a model call; logs what deserves a line.

    Store failures are logged once per occurrence with their message (which names the
    digest); an unexpected exception is a bug and is logged with its traceback. Both are EIO.
    """
    for cls, code in _ERRNO:
        if isinstance(exc, cls):
            if isinstance(exc, IntegrityError):
                log.error("integrity error (EIO): %s", exc)
            elif isinstance(exc, NotFoundError):
                log.warning("missing object (EIO): %s", exc)
            elif isinstance(exc, UnavailableError):
                log.warning("store unavailable (EIO): %s", exc)
            elif isinstance(exc, StoreError):
                log.error("store error (EIO): %s", exc)
            return code
    log.error("internal error in a FUSE request (EIO)", exc_info=exc)
    return errno.EIO
