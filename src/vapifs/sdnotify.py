"""systemd's readiness protocol: one datagram to $NOTIFY_SOCKET (Type=notify), if it is set."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send e.g. "READY=1"; False when not started by systemd or the socket is gone.

    Never blocks (MSG_DONTWAIT): it is called from the event loop.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.send(state.encode(), socket.MSG_DONTWAIT)
    except OSError as exc:
        log.warning("cannot tell systemd %s: %s", state, exc.strerror or exc)
        return False
    return True
