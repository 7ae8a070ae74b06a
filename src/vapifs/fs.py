"""The pyfuse3 adapter: FUSE requests to tree calls, errors to errnos, and file handles."""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from .api import describe
from .defaults import STATS_FILE
from .errors import VapifsError
from .reader import Stream
from .tree import ROOT_INODE, Node, Tree

log = logging.getLogger("vapifs.fs")

T = TypeVar("T")

IMMUTABLE_TIMEOUT = 3600.0
# The same failure of the same file is logged once per this many seconds: one failed `cat`
# is several FUSE reads (the kernel's read-ahead, then its retry), not several problems.
LOG_REPEAT = 10.0
MUTABLE_TIMEOUT = 1.0
# The unlisted stats file of the root (`vapifs stats`): an inode no tree node ever takes.
STATS_INODE = (1 << 63) - 1
_STATS_NAME = STATS_FILE.encode()


@dataclass
class _Handle:
    node: Node
    stream: Stream


class Operations(pyfuse3.Operations):
    """Read-only FUSE operations over a `Tree`; every write answers EROFS."""

    enable_writeback_cache = False
    supports_dot_lookup = False

    def __init__(
        self,
        tree: Tree,
        *,
        uid: int | None = None,
        gid: int | None = None,
        umask: int = 0o027,
        deadline: float = math.inf,
        stats_source: Callable[[], bytes] | None = None,
    ) -> None:
        super().__init__()
        self.tree = tree
        # No request waits longer than this, whatever it takes (a lookup that lists calls and
        # sizes a file, a decompressed read that needs several fetches): EIO instead.
        self.deadline = deadline
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.umask = umask
        self._handles: dict[int, _Handle] = {}
        self._dirs: dict[int, tuple[int, list[Node] | None]] = {}  # fh -> (inode, listing)
        self._next_fh = 1
        self._logged: dict[str, float] = {}  # failure line -> when it was last logged
        self.open_files = 0
        # The mount's live figures as JSON, read from the root's unlisted stats file.
        self._stats_source = stats_source
        self._stats_reads: dict[int, bytes] = {}  # fh -> the figures taken at open
        self._requests: set[trio.CancelScope] = set()  # requests being answered
        self._stopping = False

    def cancel_requests(self) -> None:
        """The mount is stopping: every request waiting on the network answers EIO now, and
        any later one at once."""
        self._stopping = True
        for scope in self._requests:
            scope.cancel()

    async def _guard(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run a tree call; turn its failures into the one FUSEError a handler may raise."""
        if self._stopping:
            raise pyfuse3.FUSEError(errno.EIO)
        scope = trio.CancelScope()
        self._requests.add(scope)
        try:
            with scope, trio.fail_after(self.deadline):
                return await call()
            log.debug("%s: cancelled, the mount is stopping", what)
            raise pyfuse3.FUSEError(errno.EIO)
        except trio.TooSlowError:
            self._log_failure(f"{what}: no answer from the network within {self.deadline:g}s")
            raise pyfuse3.FUSEError(errno.EIO) from None
        except pyfuse3.FUSEError:
            raise
        except VapifsError as exc:
            if exc.errno != errno.ENOENT:
                self._log_failure(f"{what}: {describe(exc)}")
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("%s: unexpected error", what)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self._requests.discard(scope)

    def _log_failure(self, line: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(line, -LOG_REPEAT) < LOG_REPEAT:
            log.debug("%s (again)", line)
            return
        if len(self._logged) > 1000:
            self._logged = {k: t for k, t in self._logged.items() if now - t < LOG_REPEAT}
        self._logged[line] = now
        log.warning("%s", line)

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        if node.is_dir:
            attrs.st_mode = stat.S_IFDIR | (0o555 & ~self.umask)
            attrs.st_nlink = 2
            attrs.st_size = 0
        elif node.target is not None:
            attrs.st_mode = stat.S_IFLNK | 0o777
            attrs.st_nlink = 1
            attrs.st_size = self.tree.size(node)
        else:
            attrs.st_mode = stat.S_IFREG | (0o444 & ~self.umask)
            attrs.st_nlink = 1
            attrs.st_size = self.tree.size(node)
        attrs.st_uid = self.uid
        attrs.st_gid = self.gid
        ns = int(node.mtime * 1e9)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = ns
        attrs.st_blksize = 1 << 20
        attrs.st_blocks = (attrs.st_size + 511) // 512
        timeout = IMMUTABLE_TIMEOUT if node.immutable else MUTABLE_TIMEOUT
        attrs.entry_timeout = timeout
        attrs.attr_timeout = timeout
        return attrs

    def _stats_attrs(self) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = STATS_INODE
        attrs.st_mode = stat.S_IFREG | (0o444 & ~self.umask)
        attrs.st_nlink = 1
        attrs.st_size = 0  # unknown until read: opened with direct_io, read to EOF
        attrs.st_uid = self.uid
        attrs.st_gid = self.gid
        attrs.st_blksize = 1 << 20
        attrs.entry_timeout = attrs.attr_timeout = MUTABLE_TIMEOUT
        return attrs

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE and name == _STATS_NAME and self._stats_source is not None:
            return self._stats_attrs()
        text = name.decode("utf-8", "surrogateescape")
        node = await self._guard(f"lookup {text!r}", lambda: self.tree.lookup(parent_inode, text))
        return self._attrs(node)

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode == STATS_INODE and self._stats_source is not None:
            return self._stats_attrs()

        async def get() -> Node:
            return self.tree.node(inode)

        return self._attrs(await self._guard("getattr", get))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # nodes are few and cheap: keep them for the life of the mount

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = await self._guard("opendir", self._node_of(inode))
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = (inode, None)
        return fh

    def _node_of(self, inode: int) -> Callable[[], Awaitable[Node]]:
        async def get() -> Node:
            return self.tree.node(inode)

        return get

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # One listing per opendir, kept until releasedir: a directory of 10,000 calls takes
        # hundreds of readdir requests, and offsets must stay stable between them.
        inode, children = self._dirs.get(fh, (fh, None))
        if children is None or start_id == 0:
            children = await self._guard("readdir", lambda: self.tree.children(inode))
            if fh in self._dirs:
                self._dirs[fh] = (inode, children)
        for index in range(start_id, len(children)):
            child = children[index]
            if not pyfuse3.readdir_reply(
                token, child.name.encode("utf-8", "surrogateescape"), self._attrs(child), index + 1
            ):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = await self._guard("readlink", self._node_of(inode))
        if node.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target.encode()

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if inode == STATS_INODE and self._stats_source is not None:
            fh = self._next_fh
            self._next_fh += 1
            self._stats_reads[fh] = self._stats_source()
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        node = await self._guard("open", self._node_of(inode))
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(node, Stream())
        self.open_files = len(self._handles)
        # Without keep_cache the kernel drops the file's cached pages on this open.
        keep_cache = node.immutable and not node.stale_pages
        node.stale_pages = False
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            figures = self._stats_reads.get(fh)
            if figures is not None:
                return figures[off : off + size]
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self._guard(
            f"read {handle.node.call_id}/{handle.node.name}",
            lambda: self.tree.read(handle.node, off, size, handle.stream),
        )

    async def release(self, fh: int) -> None:
        self._stats_reads.pop(fh, None)
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.stream.close()
        self.open_files = len(self._handles)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 1 << 20
        data.f_namemax = 255
        return data

    # getxattr and listxattr are left unimplemented (ENOSYS): the kernel then answers every
    # later call itself (EOPNOTSUPP), where an ENODATA from here would cost `ls -l` two
    # round trips to this process for every file it shows.

    # Everything that would change the tree: a read-only file system says EROFS.
    async def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = _read_only
    mknod = _read_only
    mkdir = _read_only
    unlink = _read_only
    rmdir = _read_only
    symlink = _read_only
    rename = _read_only
    link = _read_only
    create = _read_only
    write = _read_only
    setxattr = _read_only
    removexattr = _read_only
    fallocate = _read_only
