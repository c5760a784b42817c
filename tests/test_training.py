"""Training the lite model on a slice of real data, the lite encoder, and the open_clip fine-tuning path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import MEDPIX, balanced_medpix_cases, make_slice

from medsearch.catalog import Catalog
from medsearch.config import Paths
from medsearch.errors import InvalidInput, ModelNotAvailable, NotFound

pytestmark = pytest.mark.slow

FAST = dict(steps=60, batch_size=32, eval_every=20, warmup=10, crops=1, patience=10, select="dev")
CV = dict(steps=40, batch_size=32, eval_every=10, warmup=5, crops=1, patience=10, folds=3)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A home with ~20 medpix train cases and ~10 dev cases (CT and MR, all body regions)."""
    from indexer.ingest import ingest_path

    data = tmp_path_factory.mktemp("train-data")
    cases = balanced_medpix_cases(2, split="train") | balanced_medpix_cases(1, split="dev")
    make_slice(data / "medpix-2.0", MEDPIX, cases)
    h = tmp_path_factory.mktemp("train-home")
    cat = Catalog.open(h / "catalog.db")
    ingest_path(cat, data / "medpix-2.0")
    cat.close()
    return h


@pytest.fixture(scope="module")
def trained(home):
    from medsearch.train import TrainConfig, train

    cat = Catalog.open(home / "catalog.db")
    logs: list[str] = []
    res = train(cat, Paths(home), TrainConfig(**FAST), device="cpu", log=logs.append)
    cat.close()
    return res, logs


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_training_lowers_the_loss_and_saves_a_described_model(trained, home):
    res, logs = trained
    t = res.config["training"]
    assert t["loss_last"] < 0.8 * t["loss_first"], (t["loss_first"], t["loss_last"])
    assert res.model_id == "lite" and (home / "models" / "lite" / "model.safetensors").is_file()
    cfg = json.loads((home / "models" / "lite" / "config.json").read_text())
    assert cfg["dims"] == {"image_in": 1280, "text_in": 384, "hidden": 1024, "out": 256}
    assert cfg["towers"]["weights_hash"] and len(cfg["training"]["data_hash"]) == 16
    assert 0 < cfg["temperature"] < 1
    assert cfg["dev"]["split"] == "dev" and "caption_image_r10" in cfg["dev"]["best"]
    assert cfg["selection"] == {"method": "dev", "split": "dev"}
    assert t["n_pairs"] > t["n_images"] > 0 and t["views"] == 2
    assert any(m.startswith("step 20/60 loss") for m in logs)


def test_lite_loads_and_gives_identical_embeddings_after_reload(trained, home):
    import torch

    from medsearch.catalog.train_queries import pool_images
    from medsearch.encoders.registry import clear_encoder_cache, load_encoder
    from medsearch.imaging import load_image

    cat = Catalog.open(home / "catalog.db")
    rows = [(im.path, im.caption) for im in pool_images(cat)[:4]]
    cat.close()
    enc = load_encoder("lite", device="cpu", models_dir=home / "models")
    assert enc.model_id == "lite" and enc.shared_space and enc.image_dim == enc.text_dim == 256
    batch = torch.stack([enc.preprocess(load_image(p)) for p, _ in rows])
    texts = [c for _, c in rows] + ["ring enhancing lesion"]
    img, txt = enc.encode_image_batch(batch), enc.encode_texts(texts)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    clear_encoder_cache()
    again = load_encoder("lite", device="cpu", models_dir=home / "models")
    assert again is not enc and again.weights_hash == enc.weights_hash
    np.testing.assert_array_equal(again.encode_image_batch(batch), img)
    np.testing.assert_array_equal(again.encode_texts(texts), txt)
    # tower features of images that training already saw come from its cache, and match a fresh forward
    assert again.cache_hits == len(rows)
    np.testing.assert_allclose(again.image_features(batch), again.towers.image_features(batch), atol=1e-5)
    # the projection of raw tower features is the same function the encoder applies
    np.testing.assert_allclose(again.project_image_features(again.towers.image_features(batch)), img, atol=1e-6)
    assert enc.weights_hash != enc.towers.weights_hash


def test_training_is_deterministic_for_a_seed(trained, home):
    from medsearch.train import TrainConfig, train

    cat = Catalog.open(home / "catalog.db")
    train(cat, Paths(home), TrainConfig(**FAST, name="again"), device="cpu")
    other = train(cat, Paths(home), TrainConfig(**{**FAST, "steps": 20}, name="seed1", seed=1), device="cpu")
    cat.close()
    a = _files(home / "models" / "lite")["model.safetensors"]
    b = _files(home / "models" / "lite" / "again")["model.safetensors"]
    from safetensors.numpy import load as load_st

    ta, tb = load_st(a), load_st(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])
    assert not np.array_equal(load_st(_files(other.path)["model.safetensors"])["heads.image.fc1.weight"],
                              ta["heads.image.fc1.weight"])  # fmt: skip


def test_bad_inputs_leave_the_previous_model_intact(trained, home, tmp_path):
    from medsearch.train import TrainConfig, train

    before = _files(home / "models" / "lite")
    cat = Catalog.open(home / "catalog.db")
    with pytest.raises(NotFound, match="split 'nope' has no images") as e:
        train(cat, Paths(home), TrainConfig(**FAST, split="nope"), device="cpu")
    assert "train (" in e.value.hint and "dev (" in e.value.hint
    with pytest.raises(NotFound, match="split 'nodev'"):
        train(cat, Paths(home), TrainConfig(**FAST, dev_split="nodev"), device="cpu")
    with pytest.raises(ModelNotAvailable, match="does not exist") as e:
        train(cat, Paths(home), TrainConfig(**FAST, base=f"open_clip:ViT-B-32:{tmp_path / 'missing.pt'}"), device="cpu")
    assert "checkpoint" in e.value.hint
    cat.close()
    assert _files(home / "models" / "lite") == before


def test_no_pairs_is_a_clear_error(tmp_path):
    from PIL import Image

    from indexer.ingest import ingest_path
    from medsearch.train import TrainConfig, train

    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(2):
        Image.new("L", (64, 64), color=40 * i).save(folder / f"im{i}.png")
    (folder / "reports.csv").write_text("file,split\nim0.png,train\nim1.png,train\n")
    cat = Catalog.open(tmp_path / "h" / "catalog.db")
    ingest_path(cat, folder)
    with pytest.raises(InvalidInput, match="no \\(image, text\\) pairs in split 'train'") as e:
        train(cat, Paths(tmp_path / "h"), TrainConfig(**FAST), device="cpu")
    assert "caption" in e.value.hint
    assert not (tmp_path / "h" / "models" / "lite").exists()


def test_missing_lite_model_names_the_command(tmp_path):
    from medsearch.encoders.registry import load_encoder

    with pytest.raises(ModelNotAvailable, match="no trained lite model") as e:
        load_encoder("lite", device="cpu", models_dir=tmp_path)
    assert "medsearch train" in e.value.hint


def test_unfreeze_trains_the_last_block_and_reloads(trained, home):
    import torch

    from medsearch.encoders.registry import clear_encoder_cache, load_encoder
    from medsearch.imaging import load_image
    from medsearch.train import TrainConfig, train

    cat = Catalog.open(home / "catalog.db")
    res = train(cat, Paths(home), TrainConfig(**{**FAST, "crops": 0, "steps": 20}, unfreeze=1, name="unfrozen"),
                device="cpu")  # fmt: skip
    path = cat.db.execute("SELECT path FROM images ORDER BY id LIMIT 1").fetchone()[0]
    cat.close()
    assert res.config["unfreeze"] == 1
    from safetensors.numpy import load_file

    keys = load_file(str(res.path / "model.safetensors")).keys()
    assert any(k.startswith("tower._blocks.15.") for k in keys) and not any(
        k.startswith("tower._blocks.14.") for k in keys
    )
    enc = load_encoder("lite:unfrozen", device="cpu", models_dir=home / "models")
    assert not enc.frozen_towers and enc.model_id == "lite:unfrozen"
    x = enc.preprocess(load_image(path))[None]
    v = enc.encode_image_batch(x)
    # the fine-tuned block changed the features (the shared frozen towers are untouched)
    assert not np.allclose(enc.image_features(x), enc.towers.image_features(x))
    clear_encoder_cache()
    np.testing.assert_array_equal(
        load_encoder("lite:unfrozen", device="cpu", models_dir=home / "models").encode_image_batch(x), v
    )
    del torch


TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def test_open_clip_local_checkpoint_fine_tunes_and_resumes(home, tmp_path):
    import open_clip
    import torch

    from medsearch.encoders.registry import load_encoder
    from medsearch.train import TrainConfig, train

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "medsearch-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    base = open_clip.create_model("medsearch-tiny")  # the test's own weights
    ckpt = tmp_path / "tiny.pt"
    torch.save(base.state_dict(), ckpt)
    spec = f"open_clip:medsearch-tiny:{ckpt}"
    before = load_encoder(spec, device="cpu")
    cfg = TrainConfig(base=spec, steps=6, batch_size=8, grad_accum=2, eval_every=3, checkpoint_every=3, lr=1e-3,
                      warmup=1, name="tiny")  # fmt: skip
    cat = Catalog.open(home / "catalog.db")
    logs: list[str] = []
    res = train(cat, Paths(home), cfg, device="cpu", log=logs.append)
    assert res.model_id == f"open_clip:medsearch-tiny:{res.path}" and res.path.is_file()
    t = res.config["training"]
    assert t["steps_run"] == 6 and t["grad_accum"] == 2 and t["micro_batch"] == 4 and np.isfinite(t["loss_last"])
    cks = sorted((home / "models" / "checkpoints" / "tiny-ft").glob("step-*.pt"))
    assert [p.name for p in cks] == ["step-0000003.pt", "step-0000006.pt"]
    tuned = load_encoder(res.model_id, device="cpu")
    texts = ["axial CT of the brain", "chest radiograph"]
    assert tuned.image_dim == 32
    assert not np.allclose(tuned.encode_texts(texts), before.encode_texts(texts))
    # a crash after step 3 (the step-6 checkpoint never written): the same command resumes at step 3
    cks[-1].unlink()
    logs.clear()
    res2 = train(cat, Paths(home), cfg, device="cpu", log=logs.append)
    cat.close()
    assert any("resumed from" in m and "step-0000003.pt" in m for m in logs)
    assert res2.config["training"]["steps_run"] == 6
    assert sorted(p.name for p in cks[0].parent.glob("step-*.pt")) == ["step-0000003.pt", "step-0000006.pt"]


def test_demo_reuses_a_trained_model(trained, home):
    from medsearch.train import ensure_trained_for_demo

    said: list[str] = []
    cat = Catalog.open(home / "catalog.db")
    before = (home / "models" / "lite" / "model.safetensors").stat().st_mtime_ns
    assert ensure_trained_for_demo(cat, Paths(home), device="cpu", echo=said.append) == "lite"
    cat.close()
    assert any("lite model found" in m for m in said)
    assert (home / "models" / "lite" / "model.safetensors").stat().st_mtime_ns == before


def test_cli_train_then_eval_retrieval(trained, home, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    args = ["--home", str(home)]
    r = runner.invoke(
        app, ["train", *args, "--steps", "20", "--crops", "1", "--batch-size", "32", "--name", "cli", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == "lite:cli"
    png = tmp_path / "curves.png"
    r = runner.invoke(
        app, ["eval", "retrieval", "medpix-2.0", *args, "--model", "lite:cli", "--plot", str(png), "--n-boot", "200"]
    )
    assert r.exit_code == 0, r.output
    for text in ("caption->image R@10", "caption->same-case R@10", "caption->case R@10", "image->caption R@1",
                 "median rank", "findings->same case R@10 (image)", "image->image P@10 modality_type",
                 "body_region accuracy (kNN vote)", "modality_type accuracy (zero-shot)", "Duplicate captions:",
                 "frozen towers", "chance", "bootstrap over cases", "Levels:"):  # fmt: skip
        assert text in r.stdout, text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = runner.invoke(
        app, ["eval", "retrieval", "medpix-2.0", *args, "--model", "lite:cli", "--json", "--n-boot", "100"]
    )
    rep = json.loads(r.stdout)
    assert rep["pool"]["kind"] == "split" and rep["model"] == "lite:cli"
    assert 0 <= rep["cross-modal"]["caption->image"]["R@10"]["value"] <= 1
    lo, hi = rep["cross-modal"]["caption->image"]["R@10"]["ci95"]
    assert lo <= rep["cross-modal"]["caption->image"]["R@10"]["value"] <= hi
    cm = rep["cross-modal"]
    # case level: one hit per case ranks fewer items than the image ranking, so it can only find more
    assert cm["caption->case"]["pool"] == rep["pool"]["cases"] < cm["caption->same-case"]["pool"]
    assert cm["caption->case"]["R@10"]["value"] >= cm["caption->same-case"]["R@10"]["value"] - 1e-9
    assert cm["caption->same-case"]["R@10"]["value"] >= cm["caption->image"]["R@10"]["value"] - 1e-9
    assert cm["caption->image"]["R@10"]["n_cases"] == rep["pool"]["cases"]
    # pool = the dev split, whose own texts are hidden: no text mode is left, only the image mode
    assert set(rep["findings->same case R@10"]) == {"image", "note"}
    r = runner.invoke(app, ["eval", "retrieval", "medpix-2.0", *args, "--split", "nope"])
    assert r.exit_code == 2 and "split 'nope' has no images" in r.output


def test_label_positives_follow_catalog_metadata(home):
    """Image-image positives by metadata: equal and known on every listed field, nothing else."""
    from medsearch.train import collect_pairs, label_mask

    cat = Catalog.open(home / "catalog.db", readonly=True)
    pairs = collect_pairs(cat, "train")
    cat.close()
    idx = np.arange(len(pairs.image_ids))
    mod = np.array(pairs.image_labels["modality_type"], dtype=object)
    reg = np.array(pairs.image_labels["body_region"], dtype=object)
    assert {"CT", "MR"} <= set(mod)  # the slice is balanced over modalities
    m = label_mask(pairs, idx, ("modality_type",))
    for i in range(len(idx)):  # brute force
        for j in range(len(idx)):
            assert m[i, j] == (mod[i] is not None and mod[i] == mod[j])
    both = label_mask(pairs, idx, ("modality_type", "body_region"))
    assert np.array_equal(both, m & (reg[:, None] == reg[None, :]) & (reg != None)[:, None])  # noqa: E711
    assert not label_mask(pairs, idx, ()).any()
    with pytest.raises(InvalidInput, match="unknown label field"):
        label_mask(pairs, idx, ("no_such_field",))


# ---------------------------------------------------------------------------- --select cv


def test_case_folds_keep_each_case_in_one_fold():
    from medsearch.train import case_folds

    rng = np.random.default_rng(0)
    cases = rng.integers(100, 160, size=400)  # ~60 cases of 1..15 images
    f = case_folds(cases, 4, seed=0)
    assert set(f.tolist()) == {0, 1, 2, 3}
    for c in np.unique(cases):
        assert len(set(f[cases == c].tolist())) == 1, c
    sizes = np.bincount(f)
    assert sizes.max() - sizes.min() <= np.bincount(cases).max()  # greedy balance: within one case's size
    assert np.array_equal(case_folds(cases, 4, seed=0), f)  # seeded
    assert not np.array_equal(case_folds(cases, 4, seed=1), f)
    with pytest.raises(InvalidInput, match="needs at least 5 cases") as e:
        case_folds(np.array([1, 1, 2, 3, 4]), 5)
    assert "--folds" in e.value.hint
    with pytest.raises(InvalidInput, match="at least 2 folds"):
        case_folds(cases, 1)


def test_parse_grid_is_a_cartesian_product_with_clear_errors():
    from medsearch.train import parse_grid

    assert parse_grid("") == ((),) and parse_grid(None) == ((),)
    g = parse_grid("dropout=0.5,0.7; image_image=1")
    assert g == ((("dropout", 0.5), ("image_image", 1.0)), (("dropout", 0.7), ("image_image", 1.0)))
    assert parse_grid("hidden=512,1024")[1] == (("hidden", 1024),)
    with pytest.raises(InvalidInput, match="bad --cv-grid entry") as e:
        parse_grid("nonsense=1")
    assert "dropout" in e.value.hint
    with pytest.raises(InvalidInput, match="bad value"):
        parse_grid("dropout=high")


def test_pair_subset_reindexes_images_and_texts(home):
    from medsearch.train import collect_pairs

    cat = Catalog.open(home / "catalog.db", readonly=True)
    pairs = collect_pairs(cat, "train")
    cat.close()
    keep = np.arange(0, len(pairs.image_ids), 2)
    sub, kept = pairs.subset(keep)
    assert sub.image_ids.tolist() == pairs.image_ids[keep].tolist()
    want = {(int(pairs.image_ids[i]), pairs.texts[t], k)
            for i, t, k in zip(pairs.pair_image, pairs.pair_text, pairs.pair_kind, strict=True) if i in set(keep)}  # fmt: skip
    got = {(int(sub.image_ids[i]), sub.texts[t], k) for i, t, k in zip(sub.pair_image, sub.pair_text, sub.pair_kind, strict=True)}
    assert got == want and [pairs.texts[t] for t in kept] == sub.texts
    assert sub.image_labels["modality_type"] == [pairs.image_labels["modality_type"][i] for i in keep]


def test_cv_selection_never_reads_the_dev_split_and_records_its_choice(home):
    """--select cv: the folds come from train only (the dev split may even be missing), every grid point is
    scored on every fold, the refit runs the chosen number of steps, and the manifest says so."""
    from medsearch.train import TrainConfig, parse_grid, train

    cat = Catalog.open(home / "catalog.db")
    logs: list[str] = []
    cfg = TrainConfig(**CV, cv_grid=parse_grid("dropout=0.3,0.7"), name="cv", dev_split="nope")
    res = train(cat, Paths(home), cfg, device="cpu", log=logs.append)
    cat.close()
    sel = res.config["selection"]
    assert sel["method"] == "cv" and sel["folds"] == 3 and len(sel["fold_sizes"]) == 3
    assert sum(f["images"] for f in sel["fold_sizes"]) == res.config["training"]["n_images"]
    assert [g["params"] for g in sel["grid"]] == [{"dropout": 0.3}, {"dropout": 0.7}]
    for g in sel["grid"]:
        assert len(g["fold_scores"]) == 3 and [s for s, _ in g["curve"]][:2] == [10, 20]
        assert g["cv_score"] == max(m for _, m in g["curve"])
        assert abs(np.mean(g["fold_scores"]) - g["cv_score"]) < 1e-3
    best = max(sel["grid"], key=lambda g: g["cv_score"])
    assert sel["chosen"]["params"] == best["params"] and sel["chosen"]["step"] == best["best_step"]
    t = res.config["training"]
    assert t["steps_run"] == sel["chosen"]["step"] and t["steps_planned"] == 40 and t["select"] == "cv"
    assert t["dropout"] == best["params"]["dropout"] and res.config["dev"] is None
    assert any(m.startswith("cv: 3 folds of train grouped by case") for m in logs)
    assert not any("dev" in m.split("held-out")[0] for m in logs if m.startswith("step "))


def test_cli_train_select_cv_prints_the_choice(home):
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, ["train", "--home", str(home), "--steps", "20", "--crops", "0", "--batch-size", "32",
                                 "--folds", "2", "--cv-grid", "", "--name", "cvcli", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "cv (2 folds of train by case): chose the recipe" in r.stdout
    r = CliRunner().invoke(app, ["train", "--home", str(home), "--select", "sometimes"])
    assert r.exit_code != 0 and "unknown --select 'sometimes'" in r.output
    r = CliRunner().invoke(app, ["train", "--home", str(home), "--cv-grid", "colour=red"])
    assert r.exit_code != 0 and "bad --cv-grid entry" in r.output


def test_eval_hides_the_evaluated_splits_own_text(home):
    """The text/BM25 modes of `eval retrieval` never see the captions or reports of the evaluated split."""
    from medsearch.catalog.train_queries import pool_images
    from medsearch.eval.retrieval import EvalConfig, load_eval_set

    cat = Catalog.open(home / "catalog.db", readonly=True)
    rows = pool_images(cat)
    dev_texts = {" ".join(r.caption.split()) for r in rows if r.split == "dev" and r.caption}
    dev_texts |= {" ".join(t.split()) for r in rows if r.split == "dev" for t in r.sections.values() if t}
    train_caps = {" ".join(r.caption.split()) for r in rows if r.split == "train" and r.caption}
    es = load_eval_set(cat, EvalConfig(split="dev", pool="all"))
    assert es.docs and not (set(es.docs) & (dev_texts - train_caps))
    assert not set(es.doc_case.tolist()) & set(es.case[es.is_query].tolist())
    assert train_caps <= set(es.docs)  # the rest of the archive stays searchable
    assert load_eval_set(cat, EvalConfig(split="dev")).docs == []  # pool = dev only: nothing left
    shown = load_eval_set(cat, EvalConfig(split="dev", hide_split_text=False))
    cat.close()
    assert dev_texts & set(shown.docs)


def test_tta_views_are_deterministic_images_with_clear_errors():
    import torch

    from medsearch.encoders.features import TTA_VIEWS, check_tta, tta_view

    g = torch.Generator().manual_seed(0)
    x = 40 + 150 * torch.rand((2, 3, 224, 224), generator=g)  # (n, 3, H, W) grey levels 40..190
    x[:, 1:] = x[:, :1]  # grayscale in RGB, like a scan
    np.testing.assert_array_equal(tta_view(x, "flip").numpy(), x.numpy()[..., ::-1])
    assert tta_view(x, "s288").shape == (2, 3, 288, 288) and tta_view(x, "zoom").shape == x.shape
    win = tta_view(x, "win")
    grey = win.mean(1).reshape(2, -1)
    assert float(grey.min()) == 0.0 and float(grey.max()) == 255.0  # p1..p99 stretched to the full range
    assert abs(float((grey == 0).float().mean()) - 0.01) < 0.005  # about 1% clipped at each end
    eq = tta_view(x, "eq")
    assert eq.shape == x.shape and float(eq.max()) == 255.0 and float(eq.min()) < float(x.min())
    for v in TTA_VIEWS:
        np.testing.assert_array_equal(tta_view(x, v).numpy(), tta_view(x.clone(), v).numpy())
        assert 0.0 <= float(tta_view(x, v).min()) and float(tta_view(x, v).max()) <= 255.0
    with pytest.raises(InvalidInput, match="'blur'") as e:
        check_tta(["flip", "blur"])
    assert "s288" in e.value.hint
    with pytest.raises(InvalidInput, match="repeated"):
        check_tta(["flip", "flip"])


def test_tta_ensemble_model_pools_its_views_and_averages_its_heads(trained, home):
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from medsearch.catalog.train_queries import pool_images
    from medsearch.encoders.lite import make_heads
    from medsearch.encoders.registry import clear_encoder_cache, load_encoder
    from medsearch.imaging import load_image
    from medsearch.train import TrainConfig, train

    cat = Catalog.open(home / "catalog.db")
    res = train(cat, Paths(home), TrainConfig(**{**FAST, "crops": 0, "steps": 20, "select": "none"}, tta=("flip",),
                ensemble=2, name="tta-ens"), device="cpu")  # fmt: skip
    rows = [im.path for im in pool_images(cat)[:3]]
    cat.close()
    assert res.config["members"] == 2 and res.config["tta"] == ["flip"]
    state = load_file(str(res.path / "model.safetensors"))
    assert "member1.heads.image.fc1.weight" in state and "member2.heads.image.fc1.weight" not in state
    assert not torch.equal(state["heads.image.fc1.weight"], state["member1.heads.image.fc1.weight"])  # other seed
    clear_encoder_cache()
    enc = load_encoder("lite:tta-ens", device="cpu", models_dir=home / "models")
    assert not enc.frozen_towers  # eval must embed through the encoder, not the centre-view cache
    x = torch.stack([enc.preprocess(load_image(p)) for p in rows])  # (3, 3, 224, 224)
    # the image feature is the mean of the centre and the flipped input, computed here from the towers
    fresh = (enc.towers.image_features(x) + enc.towers.image_features(x.flip(-1))) / 2
    np.testing.assert_allclose(enc.image_features(x), fresh, atol=1e-4)
    u8 = torch.stack([enc.preprocess_u8(load_image(p)) for p in rows])  # the uint8 path the indexer ships
    np.testing.assert_allclose(enc.image_features(u8), fresh, atol=1e-3)
    # the embedding: each member's unit vector, averaged, normalised again
    members = []
    for prefix in ("heads.", "member1.heads."):
        h = make_heads(res.config)
        h.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        members.append(h.eval())
    feats = torch.from_numpy(fresh)
    with torch.no_grad():
        want = F.normalize(sum(F.normalize(h.image(feats), dim=-1) for h in members), dim=-1).numpy()
        one = F.normalize(members[0].image(feats), dim=-1).numpy()
    got = enc.encode_image_batch(x)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.allclose(got, one, atol=1e-3)


def test_cv_ensemble_scores_each_seed_and_their_average(home):
    from dataclasses import replace

    from medsearch.encoders.registry import load_encoder
    from medsearch.train import TrainConfig
    from medsearch.train.dev import DevSet, dev_scores
    from medsearch.train.fit import fit_heads, schedule_total
    from medsearch.train.lite import training_features
    from medsearch.train.select import _fold_parts, case_folds, cv_ensemble, embed_heldout

    cfg = TrainConfig(**{**CV, "crops": 0})
    cat = Catalog.open(home / "catalog.db")
    pairs, img, txt = training_features(cat, Paths(home), cfg, towers=load_encoder("towers", device="cpu"))
    cat.close()
    assert img.shape == (len(pairs.image_ids), 1, 1280) and txt.shape == (len(pairs.texts), 384)
    r = cv_ensemble(pairs, img, txt, cfg, step=20, seeds=[0, 1], device="cpu")
    assert len(r["single"]) == 3 and all(len(s) == 2 for s in r["single"]) and len(r["ensemble"]) == 3
    assert all(0.0 <= v <= 1.0 for v in r["ensemble"])
    # seed 1's fold-0 score is a fit of that fold's train part, scored on its held-out part
    folds = case_folds(pairs.image_case, 3, cfg.fold_seed)
    tr, tr_img, tr_txt, held = _fold_parts(pairs, img, txt, folds, 3)[0]
    f1 = fit_heads(tr, tr_img, tr_txt, replace(cfg, seed=1), total=schedule_total(cfg, tr.n_pairs), stop_at=20)
    assert r["single"][0][1] == round(dev_scores(held, *embed_heldout([f1], held))["score"], 4)
    assert not set(held.pairs.image_case.tolist()) & set(tr.image_case.tolist())  # no case on both sides
    # an ensemble of one run twice is that run
    fit = fit_heads(pairs, img, txt, cfg, total=40, stop_at=10)
    dev = DevSet(pairs, img[:, 0], txt)
    a, b = embed_heldout([fit], dev), embed_heldout([fit, fit], dev)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert dev_scores(dev, *a)["score"] == pytest.approx(dev_scores(dev, *b)["score"])
