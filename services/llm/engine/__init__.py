"""The LLM engine (core.py): batched continuous decoding on one thread that owns torch."""

from services.llm.engine.batch import Finished, events_until_finished
from services.llm.engine.core import Engine, shutting_down

__all__ = ["Engine", "Finished", "events_until_finished", "shutting_down"]
