"""A fake Vapi (API and signed-URL storage) serving deterministic synthetic calls."""

from __future__ import annotations

from vapifs.demo.data import KINDS, FakeCall, extra_call, generate_calls, make_call
from vapifs.demo.faults import Knobs
from vapifs.demo.server import FakeVapi

__all__ = ["KINDS", "FakeCall", "FakeVapi", "Knobs", "extra_call", "generate_calls", "make_call"]
