"""The soak's short version: benchmarks/soak.py for 60 s of serving against a copy of the small home.

A real `medsearch serve` under the script's supervisor, 3 client threads (text, image upload, case
view, draft), a writer ingesting new medpix-2.0 cases and indexing them with seeded SIGKILLs, and one
SIGKILL of the server. The script's own checks decide its exit code; the test reads its JSON and
asserts each figure so a failure names what broke.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_soak_60s(small_home, tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "benchmarks/soak.py", "--seconds", "60", "--clients", "3", "--batch", "2",
           "--kill-prob", "0.5", "--seed", "16", "--base-home", str(small_home), "--work", str(tmp_path / "work"),
           "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    summary = r.stdout[-2500:]
    total = next(x for x in res["latency"] if x["kind"] == "all")
    assert total["ok"] > 0 and all(x["ok"] > 0 for x in res["latency"]), summary  # every kind answered
    outside = res["errors"]["outside_restart"]
    assert not {k: v for k, v in outside.items() if k[0] == "5" or k == "404" or not k.isdigit()}, summary
    srv = res["server"]
    assert srv["planned_kills"] == 1 and srv["restarts"] == 1 and srv["unplanned_deaths"] == 0, srv
    w = res["writer"]
    assert w["kills"] and not w["failures"] and w["cases_added"] > 0, w
    rows = res["rows"]
    for key in ("lost", "duplicated", "phantom", "wrong_image_counts", "missing_cases", "missing_images", "mismatched"):
        assert rows[key] == [], (key, rows[key])
    assert rows["catalog_cases"] == rows["expected_cases"] and rows["hit_images"] > 0
    assert len(res["generations"]) >= 2, res["generations"]  # a hot swap under load
    assert res["stray_tmp"] == [], res["stray_tmp"]
    assert res["served"]["ok"] and res["check"]["ok"] and res["audit"]["ok"], (
        res["served"],
        res["check"],
        res["audit"],
    )
    assert res["rss"]["samples"] >= 6 and res["rss"]["growth"] < 0.25, {
        k: v for k, v in res["rss"].items() if k != "series"
    }
    assert r.returncode == 0 and res["failed"] == [], summary
