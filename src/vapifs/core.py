"""Wiring of the FUSE-free core, shared by the mount and by prefetch."""

from __future__ import annotations

import http.cookiejar
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpcore
import httpx
import trio

from . import __version__, h11buffer, tlsstream
from .api import VapiClient
from .blocks import BlockCache
from .changes import Changes
from .crypto import Cipher
from .defaults import DEFAULT_STORAGE_CONNECTIONS
from .fetch import Fetcher
from .meta import MetaStore
from .rate import Governor
from .reader import ArtifactStore
from .resolver import Resolver
from .retry import RetryPolicy
from .tls import client_context
from .urlbook import UrlBook

# httpcore reads a response 64 KiB at a time, and each read climbs through h11, httpcore and
# httpx: on a fast link that per-read cost, not the network, caps a download (one connection
# on loopback: about 360 MB/s with 64 KiB reads, 850 MB/s with 1 MiB). A read returns what
# the socket holds at the moment, so a slow link still hands over bytes as they come.
SOCKET_READ = 1 << 20


def larger_socket_reads(size: int = SOCKET_READ) -> None:
    """Let every HTTP/1.1 connection of this process read up to `size` bytes at a time."""
    conn = getattr(httpcore, "AsyncHTTP11Connection", None)
    current = getattr(conn, "READ_NUM_BYTES", None)
    if conn is not None and isinstance(current, int) and current < size:
        conn.READ_NUM_BYTES = size


class NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing: neither the API nor a storage host needs cookies, and
    httpx's cookie handling is a sixth of the time of a small request on a fast link."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None


def http_client(
    *,
    read_timeout: float,
    stall_timeout: float,
    connect_timeout: float = 5.0,
    ca_file: Path | None = None,
    storage_connections: int = DEFAULT_STORAGE_CONNECTIONS,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The one HTTP client of a process: API and storage, bounded connections and waits.

    Certificates are verified against the system's CAs plus SSL_CERT_FILE and `ca_file`;
    HTTPS_PROXY, HTTP_PROXY and NO_PROXY (or their lowercase forms) are honoured as curl does.
    """
    larger_socket_reads()
    h11buffer.install()
    tlsstream.install()
    timeout = httpx.Timeout(
        connect=connect_timeout, read=stall_timeout, write=10.0, pool=read_timeout
    )
    # Storage requests at once, and room beside them for the API's.
    limits = httpx.Limits(
        max_connections=storage_connections + 16,
        max_keepalive_connections=storage_connections + 8,
    )
    headers = {"User-Agent": f"vapifs/{__version__}"}
    return httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        headers=headers,
        cookies=NoCookies(),
        verify=client_context(ca_file),
        transport=transport,
    )


def api_client(
    client: httpx.AsyncClient,
    api_url: str,
    api_key: str,
    *,
    rate: float | None = None,
    book: UrlBook | None = None,
) -> VapiClient:
    """The API client of a process: every request it makes shares one budget of `rate`/s;
    the signed URLs of the call objects it receives go into `book`."""
    governor = Governor(rate) if rate is not None else Governor()
    return VapiClient(client, api_url, api_key, policy=RetryPolicy(), governor=governor, book=book)


class CoreOptions(Protocol):
    """What opening the core takes from a command's options (the mount's, prefetch's)."""

    api_url: str
    cache_dir: Path
    cache_size: int
    read_timeout: float
    stall_timeout: float
    api_rate: float
    storage_connections: int
    ca_file: Path | None


@dataclass
class Core:
    """Everything that reads artifacts, from the API and the signed URLs to the disk cache,
    and the nursery its background tasks run in (callers may start theirs there too)."""

    client: httpx.AsyncClient
    api: VapiClient
    nursery: trio.Nursery
    resolver: Resolver
    fetcher: Fetcher
    cache: BlockCache
    meta: MetaStore
    store: ArtifactStore
    changes: Changes  # what the store tells of artifacts: for the tree


async def open_core(
    nursery: trio.Nursery,
    client: httpx.AsyncClient,
    api: VapiClient,
    cache_dir: Path,
    cache_size: int,
    cipher: Cipher | None,
    *,
    book: UrlBook,
    revalidate_after: float,
    read_timeout: float,
    wall_clock: Callable[[], float] = time.time,
    storage_connections: int = DEFAULT_STORAGE_CONNECTIONS,
) -> Core:
    """Open the caches under `cache_dir` and build the read path; its tasks (the disk
    writers among them, started before this returns) run in `nursery`."""
    await trio.to_thread.run_sync(lambda: cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700))
    cache = BlockCache(cache_dir, cache_size, cipher=cipher)
    meta = MetaStore(cache_dir, cipher=cipher)
    await trio.to_thread.run_sync(cache.open)
    resolver = Resolver(api, book)
    fetcher = Fetcher(
        client, resolver, block_size=cache.block_size, max_connections=storage_connections
    )
    changes = Changes()
    store = await ArtifactStore.create(
        nursery,
        cache,
        meta,
        fetcher,
        revalidate_after=revalidate_after,
        read_timeout=read_timeout,
        wall_clock=wall_clock,
        changes=changes,
    )
    return Core(client, api, nursery, resolver, fetcher, cache, meta, store, changes)


@asynccontextmanager
async def opened_core(
    opts: CoreOptions,
    api_key: str,
    cipher: Cipher | None,
    *,
    revalidate_after: float,
    before_caches: Callable[[VapiClient], Awaitable[None]] | None = None,
    wall_clock: Callable[[], float] = time.time,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Core]:
    """The core of a process, open for the `async with`: the HTTP and API clients, the caches
    under `opts.cache_dir` and the read path. `before_caches` runs with the API client before
    any cache is opened (the mount's key check). On exit the core's nursery is cancelled, then
    the HTTP client closed: what must reach the disk first is the caller's to flush."""
    client = http_client(
        read_timeout=opts.read_timeout,
        stall_timeout=opts.stall_timeout,
        ca_file=opts.ca_file,
        storage_connections=opts.storage_connections,
        transport=transport,
    )
    async with client:
        # Listings carry fresh signed URLs: the API client writes them here, the resolver
        # reads them.
        book = UrlBook()
        api = api_client(client, opts.api_url, api_key, rate=opts.api_rate, book=book)
        if before_caches is not None:
            await before_caches(api)
        async with trio.open_nursery() as nursery:
            try:
                yield await open_core(
                    nursery,
                    client,
                    api,
                    opts.cache_dir,
                    opts.cache_size,
                    cipher,
                    book=book,
                    revalidate_after=revalidate_after,
                    read_timeout=opts.read_timeout,
                    wall_clock=wall_clock,
                    storage_connections=opts.storage_connections,
                )
            finally:
                nursery.cancel_scope.cancel()
