"""``load_encoder(spec)``: the one way the shells and the pipeline get an encoder.

Specs:

    towers                                  frozen EfficientNet-Lite0 + MiniLM (no training needed)
    lite                                    trained projection heads over the towers (models_dir/lite)
    open_clip:ARCH:/path/to/checkpoint.pt   local open_clip checkpoint
    open_clip:ARCH:TAG                      open_clip pretrained tag, weights already cached
    hf-hub:ORG/NAME                         open_clip model in the local Hugging Face cache

Loaded encoders are cached per (spec, device, models_dir) in-process, so a server loads a
model once. The key also carries the size/mtime of the weight files a spec points at, so
re-training ``lite`` or overwriting a checkpoint loads the new weights.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import cast

from medsearch.encoders.base import Encoder, pick_device
from medsearch.errors import ModelNotAvailable

VALID_SPECS = (
    "towers",
    "lite",
    "open_clip:ARCH:/path/to/checkpoint.pt",
    "open_clip:ARCH:PRETRAINED_TAG",
    "hf-hub:ORG/NAME",
)

_cache: dict[tuple[object, ...], Encoder] = {}
_lock = threading.RLock()  # re-entrant: lite.load() asks the registry for the shared towers


def _stamp(path: Path) -> tuple[object, ...]:
    """(size, mtime) of a file or of every file under a folder; () when absent."""
    if path.is_file():
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    if path.is_dir():
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file())
    return ()


def _freshness(spec: str, models_dir: Path | None) -> tuple[object, ...]:
    if spec == "lite" or spec.startswith("lite:"):
        return _stamp(models_dir / "lite") if models_dir is not None else ()
    if spec.startswith("open_clip:"):
        from medsearch.encoders.openclip import parse_spec

        try:
            kind, _arch, source = parse_spec(spec)
        except ModelNotAvailable:
            return ()
        if kind == "file":
            return _stamp(Path(source).expanduser())
    return ()


def _load_lite(spec: str, device: str, models_dir: Path | None) -> Encoder:
    # ---- HOOK: the trained "lite" model -------------------------------------------------
    # medsearch/encoders/lite.py (written separately) must provide
    #     load(models_dir: Path, device: str, name: str | None = None) -> Encoder
    # reading models_dir/"lite" (safetensors heads + JSON config over TowersEncoder features)
    # and raising ModelNotAvailable when nothing is trained there. "lite:NAME" passes NAME.
    # -------------------------------------------------------------------------------------
    hint = "run `medsearch train` to train the built-in model, or use --model towers"
    if models_dir is None:
        raise ModelNotAvailable("the lite model needs a models folder and none was given", hint=hint)
    if importlib.util.find_spec("medsearch.encoders.lite") is None:
        raise ModelNotAvailable("the lite model is not available in this installation", hint=hint)
    from medsearch.encoders import lite

    name = spec.split(":", 1)[1] if ":" in spec else None
    try:
        # cast: LiteEncoder exposes weights_hash as a read-only property (the Protocol declares a variable)
        return cast(Encoder, lite.load(models_dir, device=device, name=name))
    except FileNotFoundError as e:
        raise ModelNotAvailable(f"no trained lite model under {models_dir / 'lite'}", hint=hint) from e


def _build(spec: str, device: str, models_dir: Path | None) -> Encoder:
    if spec == "towers":
        from medsearch.encoders.towers import TowersEncoder

        return TowersEncoder(device=device)
    if spec == "lite" or spec.startswith("lite:"):
        return _load_lite(spec, device, models_dir)
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
    uses_dir = spec == "lite" or spec.startswith("lite:")
    mdir = Path(models_dir).expanduser().resolve() if models_dir is not None and uses_dir else None
    key = (spec, resolved, str(mdir), _freshness(spec, mdir))
    with _lock:  # one load at a time: two requests for one model load it once
        enc = _cache.get(key)
        if enc is None:
            enc = _build(spec, resolved, mdir)
            for old in [k for k in _cache if k[:3] == key[:3]]:  # stale weights of the same spec
                del _cache[old]
            _cache[key] = enc
        return enc


def clear_encoder_cache() -> None:
    """Forget every loaded encoder (tests; freeing memory)."""
    with _lock:
        _cache.clear()
