"""The LLM engine (core.py): batched continuous decoding on one thread that owns torch."""

from services.llm.engine.batch import Finished
from services.llm.engine.core import Engine

__all__ = ["Engine", "Finished"]
