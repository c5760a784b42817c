"""Draft generators by name: extractive (default), openai, llama-cpp, transformers."""

from __future__ import annotations

from medsearch.errors import InvalidInput
from medsearch.rag.config import GENERATORS, DraftConfig
from medsearch.rag.generators.base import Generation, Generator, OnToken


def make_generator(name: str, config: DraftConfig = DraftConfig()) -> Generator:
    """A generator by name; LLM generators load their model lazily on the first draft."""
    if name == "extractive":
        from medsearch.rag.generators.extractive import ExtractiveGenerator

        return ExtractiveGenerator(config.extractive)
    if name == "openai":
        from medsearch.rag.generators.openai_compat import OpenAICompatGenerator

        return OpenAICompatGenerator(config.llm)
    if name in ("llama-cpp", "llama_cpp", "llamacpp"):
        from medsearch.rag.generators.llamacpp import LlamaCppGenerator

        return LlamaCppGenerator(config.llm)
    if name in ("transformers", "hf"):
        from medsearch.rag.generators.hf import TransformersGenerator

        return TransformersGenerator(config.llm)
    raise InvalidInput(f"unknown generator {name!r}", hint=f"use one of: {', '.join(GENERATORS)}")


__all__ = ["Generation", "Generator", "OnToken", "make_generator", "GENERATORS"]
