"""Single flight of block loads: one load per block however many wait, and recent give-ups."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .errors import KeyRejected, NetworkError, ProtocolError, VapifsError
from .version import Version

BlockKey = tuple[str, str, str, int]  # (call id, kind, version token, block index)

# After a read of an artifact gave up on the network, reads that need the network fail at
# once for this long: the kernel retries a failed read (read-ahead, then the page itself)
# at once, which would double the time a program waits and the lines in the log. Past it, a
# read that would only wait on a download started before the give-up (the same attempt,
# still stuck) fails at once too; one that needs a new attempt gets one.
GAVE_UP_MEMO = 2.0
GAVE_UP = (NetworkError, ProtocolError, KeyRejected)


class Abandoned(NetworkError):
    """A download stopped because its reader went away; whoever still waits fetches again."""


@dataclass
class Pending:
    event: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None
    started: float = field(default_factory=trio.current_time)
    network: bool = True  # a download, not a disk read


class Inflight:
    """Blocks being loaded, each with the one Pending its readers wait on."""

    def __init__(self) -> None:
        self._pending: dict[BlockKey, Pending] = {}
        self._gave_up: dict[tuple[str, str], tuple[float, VapifsError]] = {}

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._pending

    def get(self, key: BlockKey) -> Pending | None:
        return self._pending.get(key)

    def register(
        self, call_id: str, kind: str, version: Version, indexes: list[int], network: bool = True
    ) -> dict[int, Pending]:
        """Mark blocks as in flight: from now on, other readers wait for them."""
        token = version.token()
        pendings: dict[int, Pending] = {}
        for index in indexes:
            pending = Pending(network=network)
            self._pending[(call_id, kind, token, index)] = pending
            pendings[index] = pending
        return pendings

    def settle(self, key: BlockKey, pending: Pending, data: bytes) -> None:
        """The block is here: hand it to its readers."""
        self._pending.pop(key, None)
        pending.data = data
        pending.event.set()

    def fail(self, key: BlockKey, pending: Pending, error: BaseException | None) -> None:
        """The load ended without the block: its readers get `error`."""
        self._pending.pop(key, None)
        pending.error = error
        pending.event.set()

    async def wait(
        self,
        call_id: str,
        kind: str,
        version: Version,
        found: dict[int, bytes],
        waits: dict[int, Pending],
        first: int,
        last: int,
        refetch: Callable[[int], Pending],
    ) -> list[bytes]:
        """Blocks `first`..`last`: those `found`, and those of `waits` once they arrive.

        A download abandoned by its reader is started again by `refetch` for this one."""
        for index, pending in waits.items():
            await pending.event.wait()
            while isinstance(pending.error, Abandoned):
                # Its reader closed the file; this one still wants the block.
                key = (call_id, kind, version.token(), index)
                pending = self._pending.get(key) or refetch(index)
                await pending.event.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.data is not None
            found[index] = pending.data
        return [found[i] for i in range(first, last + 1)]

    def gave_up(self, call_id: str, kind: str, exc: VapifsError) -> None:
        """Remember that a read of this artifact gave up on the network, and why."""
        if isinstance(exc, Abandoned):
            return
        now = trio.current_time()
        seen = self._gave_up.get((call_id, kind))
        if seen is None or now - seen[0] >= GAVE_UP_MEMO:  # a replay does not extend it
            self._gave_up[(call_id, kind)] = (now, exc)
        if len(self._gave_up) > 256:
            busy = {key[:2] for key in self._pending}  # stuck downloads stay remembered
            for k in [k for k, (t, _) in self._gave_up.items() if now - t >= GAVE_UP_MEMO]:
                if k not in busy:
                    del self._gave_up[k]

    def check_gave_up(self, call_id: str, kind: str) -> None:
        """Fail at once, as the last try did, if the network gave up on this artifact just now."""
        seen = self._gave_up.get((call_id, kind))
        if seen is not None and trio.current_time() - seen[0] < GAVE_UP_MEMO:
            raise type(seen[1])(str(seen[1]))

    def check_stuck(self, call_id: str, kind: str, waits: dict[int, Pending]) -> None:
        """Fail at once when this read would wait on a download that a read already gave up
        on: nothing has changed since, and waiting for it again would double the wait."""
        seen = self._gave_up.get((call_id, kind))
        if seen is None:
            return
        if any(p.network and not p.event.is_set() and p.started <= seen[0] for p in waits.values()):
            raise type(seen[1])(str(seen[1]))

    def forget_give_up(self, call_id: str, kind: str) -> None:
        """The artifact was dropped: a give-up of its old self no longer holds."""
        self._gave_up.pop((call_id, kind), None)
