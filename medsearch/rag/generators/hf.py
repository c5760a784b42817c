"""A local Hugging Face causal LM (a model folder, or a .gguf file that transformers dequantises).

Loaded once with ``local_files_only=True`` (nothing is downloaded), on CUDA when present.
The prompt goes through the tokenizer's chat template; decoding is greedy by default.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from medsearch.errors import GenerationError, InvalidInput, ModelNotAvailable
from medsearch.rag.config import LLMConfig
from medsearch.rag.evidence import EvidencePack
from medsearch.rag.generators.base import Generation, OnToken
from medsearch.rag.generators.llamacpp import PREFILL
from medsearch.rag.prompt import build_messages


class TransformersGenerator:
    """``AutoModelForCausalLM`` from a local folder (``LLMConfig.model_dir``)."""

    name = "transformers"

    def __init__(self, config: LLMConfig) -> None:
        if not config.model_dir:
            raise InvalidInput(
                "the transformers generator needs a local model folder",
                hint="pass --model-dir DIR (a Hugging Face causal LM saved with save_pretrained, or a .gguf file)",
            )
        self.path = Path(config.model_dir).expanduser()
        if not self.path.exists():
            raise InvalidInput(f"model folder {self.path} does not exist", hint="pass --model-dir with an existing folder")
        self.config = config
        self._tok: Any = None
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        return self.path.name

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from medsearch.encoders.base import pick_device

            if self.path.is_file():  # a GGUF file: transformers dequantises it (needs the gguf package)
                where, extra = str(self.path.parent), {"gguf_file": self.path.name}
            else:
                where, extra = str(self.path), {}
            try:
                tok = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
                model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, **extra)
            except (OSError, ValueError, ImportError) as e:
                raise ModelNotAvailable(f"cannot load a causal LM from {self.path}: {e}", hint="check --model-dir") from e
            device = pick_device(self.config.device)
            self._model = model.to(device).eval()
            self._tok = tok
        return self._tok, self._model

    def generate(self, pack: EvidencePack, on_token: OnToken | None = None) -> Generation:
        """Greedy generation on the chat-templated evidence prompt (streamed to ``on_token``)."""
        import torch
        from transformers import TextStreamer

        with self._lock:
            tok, model = self._load()
            messages = build_messages(pack)
            # the assistant turn is pre-filled with "FINDINGS:" (as in the llama-cpp generator)
            if getattr(tok, "chat_template", None):
                prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + PREFILL
                ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            else:
                prompt = "\n\n".join(m["content"] for m in messages) + "\n\n" + PREFILL
                ids = tok(prompt, return_tensors="pt")["input_ids"]
            ids = ids.to(model.device)
            streamer = None
            if on_token and self.config.stream:
                on_token(PREFILL)

                class _Stream(TextStreamer):
                    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                        if text:
                            on_token(text)

                streamer = _Stream(tok, skip_prompt=True, skip_special_tokens=True)
            gen_kwargs: dict[str, Any] = dict(max_new_tokens=self.config.max_tokens, streamer=streamer,
                                              repetition_penalty=self.config.repeat_penalty)
            if self.config.temperature > 0:
                gen_kwargs.update(do_sample=True, temperature=self.config.temperature)
            else:
                gen_kwargs.update(do_sample=False)
            if tok.pad_token_id is None:
                gen_kwargs["pad_token_id"] = tok.eos_token_id
            torch.manual_seed(self.config.seed)
            try:
                with torch.inference_mode():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen_kwargs)
            except (RuntimeError, ValueError) as e:
                raise GenerationError(f"{self.model} failed to generate: {e}", hint="use --fallback") from e
            text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        if not text.strip():
            raise GenerationError(f"{self.model} returned an empty completion", hint="use --fallback, or another model")
        return Generation(model=self.model, text=PREFILL + text, meta={"new_tokens": int(out.shape[1] - ids.shape[1])})
