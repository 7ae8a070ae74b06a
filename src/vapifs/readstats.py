"""The read path's counters: reads, and the blocks and bytes served from each place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReaderStats:
    reads: int = 0
    bytes_read: int = 0
    blocks_from_memory: int = 0
    blocks_from_disk: int = 0
    blocks_from_network: int = 0
    bytes_from_memory: int = 0
    bytes_from_disk: int = 0
    bytes_from_network: int = 0
    errors: int = 0
