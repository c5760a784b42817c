"""``load_encoder(spec)``: the one way the shells and the pipeline get an encoder.

Specs:

    towers                                  frozen EfficientNet-Lite0 + MiniLM (no training needed)
    lite                                    trained projection heads over the towers (models_dir/lite)
    open_clip:ARCH:/path/to/checkpoint.pt   local open_clip checkpoint
    open_clip:ARCH:TAG                      open_clip pretrained tag, weights already cached
    open_clip:local-dir:/path/to/folder     open_clip model folder (what train --base hf-hub:... writes)
    hf-hub:ORG/NAME                         open_clip model in the local Hugging Face cache

Loaded encoders are cached per (spec, device, models_dir) in-process, so a server loads a
model once. The key also carries the size/mtime of the weight files a spec points at, so
re-training ``lite`` or overwriting a checkpoint loads the new weights. A lite model gets the
process's one ``towers`` encoder from here (built first, outside the lock of the lite load).

``default_model(paths)`` is the one rule for which model a command uses when none is named.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import TYPE_CHECKING, cast

from medsearch.encoders.base import Encoder, pick_device
from medsearch.errors import ModelNotAvailable

if TYPE_CHECKING:  # pragma: no cover
    from medsearch.catalog import Catalog
    from medsearch.config import Paths
    from medsearch.encoders.towers import TowersEncoder

VALID_SPECS = (
    "towers",
    "lite",
    "open_clip:ARCH:/path/to/checkpoint.pt",
    "open_clip:ARCH:PRETRAINED_TAG",
    "open_clip:local-dir:/path/to/folder",
    "hf-hub:ORG/NAME",
)

_cache: dict[tuple[object, ...], Encoder] = {}
_lock = threading.Lock()  # one build at a time: two requests for one model load it once


def _stamp(path: Path) -> tuple[object, ...]:
    """(size, mtime) of a file or of every file under a folder; () when absent."""
    if path.is_file():
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    if path.is_dir():
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file())
    return ()


def _freshness(spec: str, models_dir: Path | None) -> tuple[object, ...]:
    if _is_lite(spec):
        return _stamp(models_dir / "lite") if models_dir is not None else ()
    if spec.startswith(("open_clip:", "hf-hub:")):
        from medsearch.encoders.openclip import parse_spec

        try:
            kind, _arch, source = parse_spec(spec)
        except ModelNotAvailable:
            return ()
        if kind in ("file", "dir"):
            return _stamp(Path(source).expanduser())
        if kind == "hub":  # the cached snapshot (cache folder + revision): a new download loads anew
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "open_clip_config.json")
            return (found,) if isinstance(found, str) else ()
    return ()


def _is_lite(spec: str) -> bool:
    return spec == "lite" or spec.startswith("lite:")


def _load_lite(spec: str, device: str, models_dir: Path | None, towers: TowersEncoder | None) -> Encoder:
    """The trained lite heads under ``models_dir/lite`` (``lite:NAME``: ``lite/NAME``) over ``towers``."""
    hint = "run `medsearch train` to train the built-in model, or use --model towers"
    if models_dir is None:
        raise ModelNotAvailable("the lite model needs a models folder and none was given", hint=hint)
    if importlib.util.find_spec("medsearch.encoders.lite") is None:
        raise ModelNotAvailable("the lite model is not available in this installation", hint=hint)
    from medsearch.encoders import lite

    assert towers is not None  # load_encoder builds them first
    name = spec.split(":", 1)[1] if ":" in spec else None
    try:
        # cast: LiteEncoder exposes weights_hash as a read-only property (the Protocol declares a variable)
        return cast(Encoder, lite.load(models_dir, towers, device=device, name=name))
    except FileNotFoundError as e:
        raise ModelNotAvailable(f"no trained lite model under {models_dir / 'lite'}", hint=hint) from e


def _build(spec: str, device: str, models_dir: Path | None, towers: TowersEncoder | None) -> Encoder:
    if spec == "towers":
        from medsearch.encoders.towers import TowersEncoder

        return TowersEncoder(device=device)
    if _is_lite(spec):
        return _load_lite(spec, device, models_dir, towers)
    if spec.startswith(("open_clip:", "hf-hub:")):
        from medsearch.encoders.openclip import OpenClipEncoder

        return OpenClipEncoder(spec, device=device)
    raise ModelNotAvailable(
        f"unknown model spec {spec!r}",
        hint="use one of: " + ", ".join(VALID_SPECS),
    )


def load_encoder(spec: str, device: str = "auto", models_dir: Path | None = None) -> Encoder:
    """Load (once per process) the encoder named by ``spec`` on ``device``.

    Raises ModelNotAvailable (unknown spec, missing package, weights not cached/trained)
    with a hint naming the command that fixes it.
    """
    spec = (spec or "").strip()
    resolved = pick_device(device)
    uses_dir = _is_lite(spec)
    mdir = Path(models_dir).expanduser().resolve() if models_dir is not None and uses_dir else None
    # the lite heads sit on the process's shared towers: get those first (their own cache entry)
    towers = cast("TowersEncoder", load_encoder("towers", resolved)) if uses_dir and mdir is not None else None
    key = (spec, resolved, str(mdir), _freshness(spec, mdir))
    with _lock:  # one load at a time: two requests for one model load it once
        enc = _cache.get(key)
        if enc is None:
            enc = _build(spec, resolved, mdir, towers)
            for old in [k for k in _cache if k[:3] == key[:3]]:  # stale weights of the same spec
                del _cache[old]
            _cache[key] = enc
        return enc


def clear_encoder_cache() -> None:
    """Forget every loaded encoder (tests; freeing memory)."""
    with _lock:
        _cache.clear()


def default_model(paths: Paths, catalog: Catalog | None = None) -> str:
    """The model every command and both shells use when none is named (``--model`` / settings):

    1. the model the last ``medsearch index`` recorded in the catalog (meta ``default_model``):
       what the home's indexes hold;
    2. else ``lite`` when a lite model is trained in the home (``models/lite/model.safetensors``);
    3. else ``towers`` (the frozen towers: nothing to train, always available).

    ``catalog``: an open catalog of ``paths`` (else the catalog file is opened read-only, when it exists).
    """
    from medsearch.encoders.lite import WEIGHTS_FILE, model_dir

    recorded = None
    if catalog is not None:
        recorded = catalog.get_meta("default_model")
    elif paths.catalog.exists():
        from medsearch.catalog import Catalog

        cat = Catalog.open(paths.catalog, create=False, readonly=True)
        try:
            recorded = cat.get_meta("default_model")
        finally:
            cat.close()
    if recorded:
        return recorded
    if (model_dir(paths.models) / WEIGHTS_FILE).is_file():
        return "lite"
    return "towers"
