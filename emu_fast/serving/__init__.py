"""Serving: emu_fast.Engine, many requests at once on one accelerated model (in-flight batching)."""
from .engine import Engine, EngineClosed, EngineFull

__all__ = ["Engine", "EngineClosed", "EngineFull"]
