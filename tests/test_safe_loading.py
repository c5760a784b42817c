"""Safe loading: weights only via safetensors or torch.load(weights_only=True); FAISS files only from
the home's index folder and only after their checksum matches the manifest."""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsearch.config import Paths
from medsearch.errors import IndexInconsistent, InvalidInput
from medsearch.stores.faiss import VectorIndex

REPO = Path(__file__).resolve().parents[1]
CODE = [p for d in ("medsearch", "indexer", "api", "cli", "benchmarks", "scripts") for p in (REPO / d).rglob("*.py")]
FORBIDDEN = {  # (module, attribute) calls that unpickle or execute stored code
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cloudpickle", "load"), ("dill", "load"),
    ("joblib", "load"), ("marshal", "loads"), ("shelve", "open"), ("jit", "load"),
}  # fmt: skip


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            yield name, node.func.attr, node


def _kw(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_every_weight_load_in_the_code_is_safe():
    assert len(CODE) > 30
    bad, torch_loads, faiss_reads = [], [], []
    for path in CODE:
        rel = path.relative_to(REPO)
        for owner, attr, node in _calls(path):
            where = f"{rel}:{node.lineno}"
            if (owner, attr) in FORBIDDEN:
                bad.append(f"{where}: {owner}.{attr}")
            if owner == "torch" and attr == "load":
                torch_loads.append(where)
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    bad.append(f"{where}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and attr == "load":
                ap = _kw(node, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    bad.append(f"{where}: np.load with allow_pickle")
            if owner == "faiss" and attr == "read_index":
                faiss_reads.append(str(rel))
    assert bad == []
    assert torch_loads, "the towers' EfficientNet .pth is loaded with torch.load: the scan must see it"
    assert set(faiss_reads) == {"medsearch/stores/faiss.py"}  # one reader, which checks the checksum first


def test_libraries_that_load_weights_for_us_default_to_weights_only():
    import open_clip.factory as ocf
    import transformers.modeling_utils as mu

    assert inspect.signature(ocf.load_state_dict).parameters["weights_only"].default is True
    assert inspect.signature(ocf.load_checkpoint).parameters["weights_only"].default is True
    assert inspect.signature(mu.load_state_dict).parameters["weights_only"].default is True


@pytest.mark.slow
def test_a_pickled_checkpoint_is_refused_not_executed(tmp_path):
    import torch

    from medsearch.encoders.registry import load_encoder

    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InvalidInput, match="refused, not executed") as e:
        load_encoder(f"open_clip:RN50:{tmp_path / 'evil.pt'}", device="cpu")
    assert "safetensors" in e.value.hint
    assert not marker.exists()


def _saved_index(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    idx = VectorIndex.from_blocks([(np.arange(200, dtype=np.int64), x)], model_id="m", weights_hash="w",
                                  space="image", dim=16, count=200)  # fmt: skip
    idx.save(tmp_path)
    return tmp_path / "image.faiss"


def test_faiss_file_is_checked_against_the_manifest_before_faiss_reads_it(tmp_path):
    f = _saved_index(tmp_path)
    good = f.read_bytes()
    # bytes FAISS cannot parse: the checksum refuses them first (else faiss would raise a RuntimeError)
    f.write_bytes(os.urandom(len(good)))
    with pytest.raises(IndexInconsistent, match="checksum"):
        VectorIndex.load(tmp_path, "image")
    # a header that declares 2**40 vectors would make FAISS try a huge allocation: never read
    off = good.find(np.int64(200).tobytes())
    assert off > 0
    f.write_bytes(good[:off] + np.int64(2**40).tobytes() + good[off + 8 :])
    with pytest.raises(IndexInconsistent, match="medsearch check --repair"):
        VectorIndex.load(tmp_path, "image")
    f.write_bytes(good)
    assert VectorIndex.load(tmp_path, "image").ntotal == 200


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.sampled_from(["..", ".", "", "../..", "/etc", "../../etc/passwd", "a/../../b", "\0", "~"]),
                 st.text(max_size=40)))  # fmt: skip
def test_index_folder_of_any_model_id_stays_inside_the_home(model_id):
    home = Path("/srv/medsearch-home")
    d = Paths(home).index_dir(model_id)
    assert d.parent == home / "indexes"
    assert d.name not in ("", ".", "..") and "/" not in d.name and "\0" not in d.name
    assert Path(os.path.normpath(d)).parent == home / "indexes"
