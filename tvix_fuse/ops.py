"""The pyfuse3 request handlers: a protocol adapter over `tvix_fuse.model.FsModel`, nothing more.

Each handler converts pyfuse3 arguments, awaits one model call and converts the answer
(`Attr` → `EntryAttributes` in `_entry`). Whatever the model raises becomes
`FUSEError(errno_for(exc))` in `_adapt`, so only FUSEError leaves a handler. Every
write-like request is EROFS. No filesystem logic lives here.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from tvix_fuse.errors import NoEntry, RequestTimeout, errno_for
from tvix_fuse.model import XATTR_PREFIX, Attr, FsModel

P = ParamSpec("P")
R = TypeVar("R")

BLKSIZE = 128 * 1024


def _adapt(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Let only FUSEError leave the handler: any other exception → its errno (errors.py); and
    end every request within the model's deadline (`FsModel.deadline`: EIO after it, whatever
    it waits for: a thread, a fetch another request started, a remote that stalls)."""

    @functools.wraps(fn)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        ops = args[0]
        assert isinstance(ops, Operations)
        try:
            with trio.fail_after(ops.model.deadline):
                return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except trio.TooSlowError:
            raise pyfuse3.FUSEError(errno_for(RequestTimeout(ops.model.deadline))) from None
        except Exception as e:
            raise pyfuse3.FUSEError(errno_for(e)) from None

    return handler


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over a model (injected, so tests can build this without a mount)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, model: FsModel, *, xattrs: bool = True) -> None:
        super().__init__()
        self.model = model
        #: False: every getxattr/listxattr is ENOSYS, which the kernel remembers for the whole
        #: mount and then answers itself (`ls -l` asks each file for two attributes: 10x faster)
        self.xattrs = xattrs
        self._uid = os.getuid()
        self._gid = os.getgid()

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.InodeT(a.ino)
        e.generation = 0
        e.entry_timeout = a.timeout
        e.attr_timeout = a.timeout
        e.st_mode = pyfuse3.ModeT(a.mode)
        e.st_nlink = 1
        e.st_uid = self._uid
        e.st_gid = self._gid
        e.st_rdev = 0
        e.st_size = a.size
        e.st_blksize = BLKSIZE
        e.st_blocks = (a.size + 511) // 512
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = 0
        return e

    # --- reading -----------------------------------------------------------------------

    @_adapt
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            return self._entry(await self.model.lookup(parent_inode, name))
        except NoEntry as e:
            if not e.ttl:
                raise
            neg = pyfuse3.EntryAttributes()  # st_ino 0: a negative entry the kernel caches
            neg.st_ino = pyfuse3.InodeT(0)
            neg.entry_timeout = e.ttl
            return neg

    @_adapt
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.model.forget(list(inode_list))

    @_adapt
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self.model.getattr(inode))

    @_adapt
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return await self.model.readlink(inode)

    @_adapt
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        fh = await self.model.open(inode, flags)
        # immutable content: keep the page cache across opens; never direct_io (breaks mmap)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)

    @_adapt
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.model.read(fh, off, size)

    # No `flush`: pyfuse3's default answers ENOSYS, after which the kernel stops sending
    # FLUSH on every close() (a read-only filesystem has nothing to flush): one round trip
    # less per opened file.

    @_adapt
    async def release(self, fh: int) -> None:
        self.model.release(fh)

    @_adapt
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        return pyfuse3.FileHandleT(await self.model.opendir(inode))

    @_adapt
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for e in await self.model.readdir(fh, start_id):
            attr = self.model.entry_attr(e)
            if not pyfuse3.readdir_reply(token, e.name, self._entry(attr), e.next_id):
                self.model.entry_refused(e, attr.ino)
                return
            self.model.entry_taken(e, attr.ino)

    @_adapt
    async def releasedir(self, fh: int) -> None:
        self.model.releasedir(fh)

    @_adapt
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLKSIZE
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.model.inodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        # `ls -l` asks every file for security.selinux and system.posix_acl_access: answered
        # here, before any deadline scope or model call (a FUSE round trip is the whole cost)
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if not name.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._getxattr(inode, name)

    @_adapt
    async def _getxattr(self, inode: int, name: bytes) -> bytes:
        return await self.model.getxattr(inode, name)

    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return await self._listxattr(inode)

    @_adapt
    async def _listxattr(self, inode: int) -> list[bytes]:
        return await self.model.listxattr(inode)

    # --- writing: read-only filesystem ----------------------------------------------------

    @_adapt
    async def _erofs(self, *args: Any) -> Any:
        self.model.read_only()

    setattr = _erofs
    mknod = _erofs
    mkdir = _erofs
    unlink = _erofs
    rmdir = _erofs
    symlink = _erofs
    rename = _erofs
    link = _erofs
    write = _erofs
    create = _erofs
    setxattr = _erofs
    removexattr = _erofs
