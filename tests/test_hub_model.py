"""The hub path a real user takes, offline: a BiomedCLIP-shaped open_clip model in the Hugging Face cache.

``medsearch index --model hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``, then search,
similar, draft, ``train --base`` that model and index the fine-tune, through the CLI on a small slice of
real medpix cases. The cache (tests/hub_fixture.py) holds both repos BiomedCLIP needs, in huggingface_hub's
own layout, with small random weights. Scores are checked against open_clip loading the same repo itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import MEDPIX, REPO, balanced_medpix_cases, make_slice
from hub_fixture import MODEL_REPO, MODEL_SPEC, TEXT_REPO, HubCache, build_hub_cache, hub_env, point_hub_at
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.slow
runner = CliRunner()
QUERY = "axial CT of the abdomen shows a hypodense liver lesion"


def _cli(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def _json(*args: str):
    return json.loads(_cli(*args, "--json"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One medpix train case and one dev case of each (modality, body region) group."""
    cases = balanced_medpix_cases(1, split="train") | balanced_medpix_cases(1, split="dev")
    return make_slice(tmp_path_factory.mktemp("hub-data") / "medpix-2.0", MEDPIX, cases)


@pytest.fixture(scope="module")
def images(data) -> dict[str, Path]:
    """image key -> file, for every image of the slice."""
    rows = [json.loads(line) for line in open(data / "images.jsonl")]
    return {r["image_id"]: data / r["file"] for r in rows}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, data) -> Iterator[HubCache]:
    """Both BiomedCLIP repos in a temporary HF_HOME, which this module's process then uses (offline)."""
    from medsearch.encoders.registry import clear_encoder_cache

    texts = [json.loads(line).get("caption") or "" for line in open(data / "images.jsonl")]
    texts += [json.loads(line).get("findings") or "" for line in open(data / "reports.jsonl")]
    cache = build_hub_cache(tmp_path_factory.mktemp("hf-home"), texts)
    clear_encoder_cache()
    with pytest.MonkeyPatch.context() as mp:
        point_hub_at(mp, cache.root)
        yield cache
    clear_encoder_cache()  # the spec must not resolve to this fixture once the cache is gone


@pytest.fixture(scope="module")
def home(tmp_path_factory, data, hub) -> tuple[Path, dict]:
    """The slice ingested and indexed with the hub model: (home, index summary)."""
    h = tmp_path_factory.mktemp("hub-home")
    _cli("ingest", str(data), "--home", str(h), "-q")
    summary = _json("index", "--home", str(h), "--model", MODEL_SPEC, "--workers", "0", "--device", "cpu")
    return h, summary


@pytest.fixture(scope="module")
def oracle(hub, images):
    """open_clip's own loading of the hub repo (not medsearch's encoder): image and text vectors."""
    import open_clip
    import torch

    from medsearch.encoders.towers import pil_to_rgb
    from medsearch.imaging import load_image

    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_SPEC, device="cpu")
    tokenizer = open_clip.get_tokenizer(MODEL_SPEC)
    model.eval()
    keys = sorted(images)
    with torch.inference_mode():
        batch = torch.stack([preprocess(pil_to_rgb(load_image(images[k]))) for k in keys])
        zi = model.encode_image(batch, normalize=True).numpy()  # (n, 32)

    def text(q: str) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_text(tokenizer([q]), normalize=True).numpy()[0]  # (32,)

    def image(path: Path) -> np.ndarray:
        with torch.inference_mode():
            x = preprocess(pil_to_rgb(load_image(path)))[None]
            return model.encode_image(x, normalize=True).numpy()[0]

    return {"keys": keys, "zi": zi, "text": text, "image": image, "tokenizer": tokenizer}


def test_fixture_has_the_real_layout_and_config(hub):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    repos = {r.repo_id: r for r in scan_cache_dir(hub.hub).repos}  # huggingface_hub reads it as its own cache
    assert set(repos) == {MODEL_REPO, TEXT_REPO}
    files = {r: {f.file_name for rev in repos[r].revisions for f in rev.files} for r in repos}
    assert files[MODEL_REPO] == {"open_clip_config.json", "open_clip_pytorch_model.bin"}
    assert files[TEXT_REPO] == {"config.json", "vocab.txt", "tokenizer_config.json"}
    snap = hub.snapshot(MODEL_REPO)
    assert (snap / "open_clip_pytorch_model.bin").is_symlink()  # snapshots point into blobs/, as downloads do
    cfg = json.loads(Path(try_to_load_from_cache(MODEL_REPO, "open_clip_config.json")).read_text())
    vision, text = cfg["model_cfg"]["vision_cfg"], cfg["model_cfg"]["text_cfg"]
    assert "timm_model_name" in vision and vision["timm_proj"] == "linear"
    assert text["hf_model_name"] == text["hf_tokenizer_name"] == TEXT_REPO
    assert (text["hf_proj_type"], text["hf_pooler_type"], text["context_length"]) == (
        "mlp", "cls_last_hidden_state_pooler", 256)  # fmt: skip


def test_index_embeds_with_the_hub_model(home, hub, images):
    from medsearch.catalog import Catalog
    from medsearch.config import Paths
    from medsearch.encoders.towers import weights_digest
    from medsearch.stores.base import manifest_path, read_manifest

    h, summary = home
    assert summary["model"] == MODEL_SPEC
    assert summary["images_embedded"] == len(images) and summary["indexes"]["image"]["count"] == len(images)
    cat = Catalog.open(h / "catalog.db", create=False, readonly=True)
    try:
        assert cat.get_meta("default_model") == MODEL_SPEC  # search/similar/draft use it without --model
    finally:
        cat.close()
    m = read_manifest(manifest_path(Paths(h).index_dir(MODEL_SPEC), "image"))
    assert (m.model_id, m.dim, m.count) == (MODEL_SPEC, 32, len(images))
    assert m.weights_hash == weights_digest([hub.snapshot(MODEL_REPO) / "open_clip_pytorch_model.bin"])


def test_search_scores_are_open_clips_own(home, oracle):
    """Text -> images in the model's space: every image's score is open_clip's cosine for it."""
    h, _ = home
    n = len(oracle["keys"])
    hits = _json("search", QUERY, "--home", str(h), "-k", str(n), "--mode", "image", "--no-understand",
                 "--all-images")  # fmt: skip
    assert len(hits) == n and all(x["matched"] == "image" for x in hits)
    want = dict(zip(oracle["keys"], oracle["zi"] @ oracle["text"](QUERY), strict=True))
    got = {x["image_key"]: x["score"] for x in hits}
    assert set(got) == set(want)
    np.testing.assert_allclose([got[k] for k in oracle["keys"]], [want[k] for k in oracle["keys"]], atol=5e-3)
    scores = [x["score"] for x in hits]
    assert scores == sorted(scores, reverse=True)
    # the default query path (hybrid, understanding on) answers too, one hit per case
    out = _cli("search", QUERY, "--home", str(h), "-k", "3")
    assert "understood:" in out


def test_long_report_text_is_not_cut_at_the_context(home):
    """PubMedBERT_256: text past 256 tokens is chunked, so its end still moves the vector."""
    from medsearch.encoders.registry import load_encoder

    enc = load_encoder(MODEL_SPEC, device="cpu")
    assert enc.text_max_tokens == 256
    long = " ".join(f"Finding {i}: a small hypodense lesion in hepatic segment {i % 8}." for i in range(40))
    chunks = enc.split_for_context(long)
    assert enc.count_tokens(long) > 256 and len(chunks) > 1
    assert all(enc.count_tokens(c) <= 256 - 2 for c in chunks)  # [CLS] ... [SEP] fit the context
    full, first = enc.encode_texts([long, chunks[0]])
    assert np.abs(full - first).max() > 1e-4  # a truncating encoder would return the first chunk's vector


def test_similar_finds_the_image_and_scores_a_new_one(home, oracle, images, tmp_path):
    from PIL import Image

    h, _ = home
    key = oracle["keys"][0]
    hits = _json("similar", str(images[key]), "--home", str(h), "-k", "3")
    assert hits[0]["image_key"] == key and hits[0]["score"] > 0.99
    # an image the catalog has never seen: its scores are open_clip's cosines against the indexed images
    new = tmp_path / "flipped.png"
    Image.open(images[key]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new)
    hits = _json("similar", str(new), "--home", str(h), "-k", str(len(images)), "--all-images")
    want = dict(zip(oracle["keys"], oracle["zi"] @ oracle["image"](new), strict=True))
    assert len(hits) == len(images)
    np.testing.assert_allclose([x["score"] for x in hits], [want[x["image_key"]] for x in hits], atol=5e-3)


def test_draft_cites_the_nearest_cases(home, images, oracle):
    h, _ = home
    key = oracle["keys"][-1]
    d = _json("draft", str(images[key]), "--home", str(h))
    assert d["generator"] == "extractive" and d["evidence"] and d["sentences"]
    evidence = {e["case_key"] for e in d["evidence"]}
    cited = {k for s in d["sentences"] for k in s["case_keys"]}
    assert cited and cited <= evidence
    own = key.split("_")[0]  # medpix image keys are CASE_synpicN
    assert own not in evidence  # a catalog image's own case is never its evidence
    near = _json("similar", str(images[key]), "--home", str(h), "-k", "1", "--exclude-own-case")
    assert near[0]["case_key"] in evidence  # the nearest other case, in the hub model's space, is cited evidence


def test_train_base_hub_then_index_the_fine_tune(home, hub, oracle, tmp_path):
    """``train --base hf-hub:...`` writes an open_clip local-dir (config, weights, tokenizer) that
    ``--model`` loads, and indexing with it changes the vectors."""
    from safetensors.torch import load_file

    h, _ = home
    res = _json("train", "--home", str(h), "--base", MODEL_SPEC, "--steps", "2", "--batch-size", "8",
                "--device", "cpu", "--dev-split", "none")  # fmt: skip
    folder = Path(res["path"]).parent
    assert res["model"] == f"open_clip:local-dir:{folder}"
    assert res["config"]["base"] == MODEL_SPEC and res["config"]["training"]["steps_run"] == 2
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    assert cfg == json.loads((hub.snapshot(MODEL_REPO) / "open_clip_config.json").read_text())  # preprocess too
    saved = json.loads((folder / "tokenizer.json").read_text())  # the fixture's WordPiece vocabulary, kept
    assert saved["model"]["vocab"] == {w: i for i, w in enumerate(hub.vocab)}
    tuned = load_file(folder / "open_clip_model.safetensors")
    assert any(k.startswith("text.transformer.") for k in tuned) and any(k.startswith("visual.trunk.") for k in tuned)

    summary = _json("index", "--home", str(h), "--model", res["model"], "--workers", "0", "--device", "cpu")
    assert summary["images_embedded"] == len(oracle["keys"])
    hits = _json("search", QUERY, "--home", str(h), "-k", str(len(oracle["keys"])), "--mode", "image",
                 "--no-understand", "--all-images")  # fmt: skip
    base = dict(zip(oracle["keys"], oracle["zi"] @ oracle["text"](QUERY), strict=True))
    assert len(hits) == len(base)
    assert max(abs(x["score"] - base[x["image_key"]]) for x in hits) > 1e-3  # the fine-tuned model answered
    _cli("index", "--home", str(h), "--model", MODEL_SPEC, "--workers", "0", "--device", "cpu", "-q")  # back

    # a copy of the folder without its tokenizer, or without weights: an error that says so, no random model
    import shutil

    from medsearch.encoders.registry import load_encoder
    from medsearch.errors import ModelNotAvailable

    for drop, said in ((("tokenizer.json", "tokenizer_config.json"), "no tokenizer files"),
                       (("open_clip_model.safetensors",), "no weights")):  # fmt: skip
        broken = tmp_path / f"no-{drop[0]}"
        shutil.copytree(folder, broken)
        for f in drop:
            (broken / f).unlink()
        with pytest.raises(ModelNotAvailable, match=said):
            load_encoder(f"open_clip:local-dir:{broken}", device="cpu")


@pytest.mark.parametrize(
    "drop, named",
    [
        ({MODEL_REPO: None}, MODEL_REPO),
        ({TEXT_REPO: None}, TEXT_REPO),
        ({TEXT_REPO: ("vocab.txt", "tokenizer_config.json")}, TEXT_REPO),  # config cached, tokenizer not
    ],
    ids=["model-repo", "text-repo", "text-tokenizer"],
)
def test_a_missing_repo_is_named_with_its_fetch_command(home, hub, tmp_path, monkeypatch, drop, named):
    import shutil

    from hub_fixture import repo_dir

    from medsearch.encoders.registry import clear_encoder_cache

    h, _ = home
    partial = tmp_path / "hf"
    shutil.copytree(hub.root, partial, symlinks=True)
    for repo, files in drop.items():
        if files is None:
            shutil.rmtree(repo_dir(partial / "hub", repo))
        else:
            rev = (repo_dir(partial / "hub", repo) / "refs" / "main").read_text()
            for f in files:
                (repo_dir(partial / "hub", repo) / "snapshots" / rev / f).unlink()
    point_hub_at(monkeypatch, partial)
    clear_encoder_cache()
    try:
        r = runner.invoke(app, ["index", "--home", str(h), "--model", MODEL_SPEC, "--workers", "0", "--rebuild"])
    finally:
        clear_encoder_cache()
    assert r.exit_code != 0
    assert named in r.output and f"hf download {named}" in r.output, r.output
    assert "Traceback" not in r.output


def test_a_fresh_process_finds_the_cache_from_hf_home(home, hub, tmp_path):
    """What a user's shell does: HF_HOME in the environment, the `medsearch` entry point, no patching."""
    h, _ = home
    env = {**os.environ, **hub_env(hub.root), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "cli.main", "search", QUERY, "--home", str(h), "-k", "2", "--json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    hits = json.loads(r.stdout)
    assert len(hits) == 2 and all(x["case_key"].startswith("MPX") for x in hits)
