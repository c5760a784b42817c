"""A full disk while an index is saved (a real, tiny tmpfs): a named error, the previous index kept.

The tmpfs is mounted in a private mount namespace (``unshare -m`` as root, ``unshare -rm`` in a
user namespace otherwise) by a child process, so nothing is left mounted whatever happens; the
test is skipped only where neither is allowed. The monkeypatched variant is in test_vectors.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    r'''
    import json, math, os, sys
    from pathlib import Path
    import faiss
    import numpy as np
    from medsearch.errors import StorageError
    from medsearch.stores.faiss import VectorIndex

    root = Path(sys.argv[1])
    d = root / "idx"
    PAGE = os.statvfs(root).f_frsize

    def build(n):
        x = np.random.default_rng(n).standard_normal((n, 16)).astype(np.float32)
        return VectorIndex.from_blocks([(np.arange(n, dtype=np.int64), x)], model_id="m", weights_hash="w",
                                       space="image", dim=16, count=n)

    def snapshot():
        return {p.name: p.read_bytes() for p in d.iterdir() if p.name != ".lock"}

    def fill(free_pages):
        """Fill the filesystem, then give back exactly ``free_pages`` pages."""
        filler = root / "filler"
        with open(filler, "ab", buffering=0) as f:
            try:
                while f.write(b"\0" * PAGE):
                    pass
            except OSError:
                pass
        os.truncate(filler, (filler.stat().st_size // PAGE - free_pages) * PAGE)
        assert os.statvfs(root).f_bavail <= free_pages + 1

    results = []
    big = build(3000)
    need = math.ceil(len(faiss.serialize_index(big.index)) / PAGE) + 2  # the index file, its manifest, slack
    for free in range(0, need + 1):  # every amount of free space from none to enough
        build(100).save(d)
        before = snapshot()
        fill(free)
        try:
            big.save(d)
            out = {"free": free, "saved": True, "loads": VectorIndex.load(d, "image", model_id="m").ntotal}
        except StorageError as e:
            out = {"free": free, "saved": False, "error": e.message, "hint": e.hint, "kept": snapshot() == before,
                   "loads": VectorIndex.load(d, "image", model_id="m").ntotal}
        out["leftovers"] = [p.name for p in d.iterdir() if p.name.endswith(".tmp")]
        results.append(out)
        (root / "filler").unlink()
    print(json.dumps(results))
    '''
)


def _namespace_cmd() -> list[str] | None:
    if shutil.which("unshare") is None:
        return None
    return ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]


def test_full_disk_during_index_save_keeps_the_previous_index(tmp_path):
    ns = _namespace_cmd()
    if ns is None:
        pytest.skip("no unshare(1): cannot mount a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cmd = [*ns, "sh", "-c", 'mount -t tmpfs -o size=512k tmpfs "$1" && exec "$2" "$3" "$1"', "sh", str(mnt),
           sys.executable, str(script)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), timeout=300)
    if r.returncode != 0 and ("mount" in r.stderr or "unshare" in r.stderr) and "Traceback" not in r.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    res = json.loads(r.stdout.strip().splitlines()[-1])
    failed = [o for o in res if not o["saved"]]
    assert failed and any(o["saved"] for o in res), res  # too little space fails, enough space saves
    assert any("write error" in o["error"] for o in failed)  # full while FAISS writes the index file
    assert any("[Errno 28]" in o["error"] for o in failed)  # index file written, full while writing the manifest
    for o in failed:  # a failed save: a named error, the old files byte for byte, still loadable
        assert "No space left on device" in o["error"] and "medsearch index" in o["hint"], o
        assert o["kept"] and o["loads"] == 100, o
    for o in res:
        assert o["leftovers"] == [], o
        if o["saved"]:
            assert o["loads"] == 3000, o  # never a mix of a new file and an old manifest
