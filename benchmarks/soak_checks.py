"""The soak's figures and checks (benchmarks/soak.py): latency per kind, errors inside and outside
the restart window, the RSS trend, the served index against the catalog, the rows the hits name,
the markdown table and the pass/fail gates."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from soak import Incarnation, Sample

KINDS = ("text", "image", "case", "draft")
SOURCE = "medpix-2.0"


def catalog_cases(home: Path) -> dict[str, int]:
    """medpix-2.0 case key -> image count in the catalog; a key seen twice appears as key#2."""
    from medsearch.catalog import Catalog

    cat = Catalog.open(home / "catalog.db", create=False, readonly=True)
    try:
        rows = cat.cases_where(source=SOURCE)
        images = cat.case_images([r.case_id for r in rows])
        out: dict[str, int] = {}
        for r in rows:
            key = r.case_key if r.case_key not in out else f"{r.case_key}#2"
            out[key] = len(images.get(r.case_id, []))
        return out
    finally:
        cat.close()


def pct(a: list[float]) -> tuple[float, float, float]:
    if not a:
        return 0.0, 0.0, 0.0
    x = np.array(a) * 1000
    return tuple(float(np.percentile(x, q)) for q in (50, 95, 99))  # type: ignore[return-value]


def in_window(s: Sample, windows: list[tuple[float, float]], grace: float = 1.0) -> bool:
    return any(s.t0 <= b + grace and s.t1 >= a for a, b in windows)


def latency_table(samples: list[Sample], seconds: float, windows: list[tuple[float, float]]) -> tuple[list[dict], dict]:
    rows, errors = [], {"inside_restart": {}, "outside_restart": {}}
    for kind in (*KINDS, "all"):
        mine = [s for s in samples if kind in ("all", s.kind)]
        ok = [s.t1 - s.t0 for s in mine if s.status == 200]
        bad: dict[str, int] = {}
        for s in mine:
            if s.status != 200:
                bad[str(s.status)] = bad.get(str(s.status), 0) + 1
                if kind == "all":
                    where = "inside_restart" if in_window(s, windows) else "outside_restart"
                    errors[where][str(s.status)] = errors[where].get(str(s.status), 0) + 1
        p50, p95, p99 = pct(ok)
        rows.append(dict(kind=kind, n=len(mine), ok=len(ok), rps=len(ok) / seconds, p50=p50, p95=p95, p99=p99,
                         errors=bad))  # fmt: skip
    return rows, errors


def rss_trend(incs: list[Incarnation]) -> dict:
    """Mean RSS of the first and the last third of the longest-serving process, after it was ready."""
    best = max(incs, key=lambda i: (i.died or 0) - (i.ready or i.died or 0))
    s = [m for t, m in best.rss_mb if best.ready is not None and t >= best.ready]
    if len(s) < 6:
        return {"pid_samples": len(s)}
    k = len(s) // 3
    first, last = float(np.mean(s[:k])), float(np.mean(s[-k:]))
    threads = [n for t, n in best.threads if best.ready is not None and t >= best.ready]
    return dict(samples=len(s), serving_s=round((best.died or 0) - (best.ready or 0), 1), first_third_mb=first,
                last_third_mb=last, growth=last / first - 1, max_mb=max(s), threads_max=max(threads or [0]),
                series=[(round(t, 1), round(m, 1)) for t, m in best.rss_mb])  # fmt: skip


def served_matches(base: str, home: Path, timeout: float) -> dict:
    """Wait until the server serves the final generation: its index counts == the catalog's vectors."""
    import httpx

    from medsearch.catalog import Catalog

    deadline = time.monotonic() + timeout
    served: dict = {}
    want: dict = {}
    while time.monotonic() < deadline:
        try:
            h = httpx.get(base + "/v1/health", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            time.sleep(1)
            continue
        cat = Catalog.open(home / "catalog.db", create=False, readonly=True)
        try:
            want = {s: n for m, s, n in cat.vector_models() if m == h.get("model") and s in ("image", "text")}
        finally:
            cat.close()
        served = {s: i["count"] for s, i in h.get("indexes", {}).items() if s in ("image", "text")}
        if want and served == want:
            return {"ok": True, "model": h.get("model"), "served": served, "catalog_vectors": want}
        time.sleep(1)
    return {"ok": False, "served": served, "catalog_vectors": want}


def check_rows(home: Path, expected: dict[str, int], hit_rows: set[tuple[int, int | None]]) -> dict:
    from medsearch.catalog import Catalog

    actual = catalog_cases(home)
    dup = sorted(k for k in actual if k.endswith("#2"))
    lost = sorted(set(expected) - set(actual))
    phantom = sorted(k for k in set(actual) - set(expected) if not k.endswith("#2"))
    wrong_images = sorted(k for k in expected if k in actual and actual[k] != expected[k])
    cat = Catalog.open(home / "catalog.db", create=False, readonly=True)
    try:
        case_ids = sorted({c for c, _ in hit_rows})
        image_ids = sorted({i for _, i in hit_rows if i is not None})
        cases = cat.case_rows(case_ids)
        images = cat.image_rows(image_ids)
    finally:
        cat.close()
    missing_cases = [c for c in case_ids if c not in cases]
    missing_images = [i for i in image_ids if i not in images]
    mismatched = sorted({(c, i) for c, i in hit_rows if i is not None and i in images and images[i].case_id != c})
    return dict(expected_cases=len(expected), catalog_cases=len(actual), lost=lost, duplicated=dup, phantom=phantom,
                wrong_image_counts=wrong_images, hit_cases=len(case_ids), hit_images=len(image_ids),
                missing_cases=missing_cases, missing_images=missing_images, mismatched=[list(x) for x in mismatched])  # fmt: skip


def markdown(res: dict) -> str:
    a = res["args"]
    out = [f"Soak: {a['seconds']:.0f} s, {a['clients']} clients, seed {a['seed']}, load {res['load_before']} -> "
           f"{res['load_after']}", "",
           "| kind | requests | ok | req/s | p50 ms | p95 ms | p99 ms | errors (status: n) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in res["latency"]:
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
        out.append(f"| {r['kind']} | {r['n']} | {r['ok']} | {r['rps']:.2f} | {r['p50']:.0f} | {r['p95']:.0f} | "
                   f"{r['p99']:.0f} | {errs} |")  # fmt: skip
    e, w, rs, rows, srv = res["errors"], res["writer"], res["rss"], res["rows"], res["server"]
    fmt = lambda d: ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "none"  # noqa: E731
    out += ["",
            f"- errors outside the restart window: {fmt(e['outside_restart'])}; inside it: {fmt(e['inside_restart'])}",
            f"- server: {srv['restarts']} restart(s) ({srv['planned_kills']} planned SIGKILL, {srv['unplanned_deaths']} "
            f"unplanned): process up again after {', '.join(f'{x:.1f} s' for x in srv['up_after_s']) or '-'}, "
            f"serving after {', '.join(f'{x:.1f} s' for x in srv['serving_after_s']) or '-'}; generations seen "
            f"by clients {min(res['generations'], default=0)}..{max(res['generations'], default=0)}; served (s: generation) "
            f"{', '.join(f'{t:.0f}: {g}' for t, g in res['served_generations'])}",
            f"- writer: {len(w['rounds'])} rounds, {w['cases_added']} cases added, {len(w['kills'])} SIGKILLs "
            f"({fmt(w['kills_by_step'])}), {len(w['failures'])} failed runs",
            f"- server RSS (longest-serving process, {rs.get('serving_s', 0)} s): first third "
            f"{rs.get('first_third_mb', 0):.0f} MiB, last third {rs.get('last_third_mb', 0):.0f} MiB "
            f"({100 * rs.get('growth', 0):+.1f} %), max {rs.get('max_mb', 0):.0f} MiB, threads max {rs.get('threads_max', 0)}",
            f"- rows: {rows['catalog_cases']} medpix cases for {rows['expected_cases']} expected: lost "
            f"{len(rows['lost'])}, duplicated {len(rows['duplicated'])}, phantom {len(rows['phantom'])}, wrong image "
            f"counts {len(rows['wrong_image_counts'])}; hits named {rows['hit_cases']} cases and {rows['hit_images']} "
            f"images, missing {len(rows['missing_cases'])} + {len(rows['missing_images'])}",
            f"- served index == catalog: {res['served']['ok']}; `medsearch check`: {res['check']['ok']}; audit chain: "
            f"{res['audit']['ok']}; temp files left: {len(res.get('stray_tmp', []))}",
            f"- checks: {'all passed' if not res['failed'] else 'FAILED: ' + '; '.join(res['failed'])}"]  # fmt: skip
    return "\n".join(out)


def gates(res: dict) -> list[str]:
    f = []
    if res["errors"]["outside_restart"]:
        bad = {
            k: v for k, v in res["errors"]["outside_restart"].items() if k[0] == "5" or k == "404" or not k.isdigit()
        }
        if bad:  # a 404 is a case view of a hit's case: a hit that named a missing row
            f.append(f"5xx, 404 or dropped connections outside the restart window: {bad}")
    srv, rows = res["server"], res["rows"]
    if srv["unplanned_deaths"]:
        f.append(f"{srv['unplanned_deaths']} unplanned server deaths")
    if srv["planned_kills"] != 1 or srv["restarts"] != 1:
        f.append(f"expected one server kill and one restart, got {srv['planned_kills']} / {srv['restarts']}")
    for key in ("lost", "duplicated", "phantom", "wrong_image_counts", "missing_cases", "missing_images", "mismatched"):
        if rows[key]:
            f.append(f"rows {key}: {rows[key][:10]}")
    if res["writer"]["failures"]:
        f.append(f"{len(res['writer']['failures'])} writer runs failed without being killed")
    if not res["writer"]["kills"]:
        f.append("the writer was never killed (raise --kill-prob or --seconds)")
    if len(res["generations"]) < 2:
        f.append(f"clients saw one generation only ({sorted(res['generations'])}): no hot swap under load")
    if res.get("stray_tmp"):
        f.append(f"temp files left in the home: {res['stray_tmp'][:10]}")
    for name in ("served", "check", "audit"):
        if not res[name]["ok"]:
            f.append(f"{name} failed: {json.dumps(res[name])[:400]}")
    if not any(r["kind"] == "all" and r["ok"] for r in res["latency"]):
        f.append("no request succeeded")
    return f


def timeline(samples: list, bucket: float = 10.0) -> list[list]:
    """Per ``bucket`` seconds (by request start): [t, requests, ok, non-200, p50 ms of the ok ones,
    newest image generation answering]; ``samples`` as (kind, t0, t1, status, generation) rows."""
    if not samples:
        return []
    out = []
    last = max(x[1] for x in samples)
    t = min(x[1] for x in samples)
    while t <= last:
        mine = [x for x in samples if t <= x[1] < t + bucket]
        ok = [x[2] - x[1] for x in mine if x[3] == 200]
        gens = [x[4] for x in mine if x[4] is not None]
        out.append([round(t), len(mine), len(ok), len(mine) - len(ok), round(pct(ok)[0]), max(gens, default=None)])
        t += bucket
    return out


def write_json(path: Path, res: dict) -> None:
    """Indented JSON with every innermost list on one line."""
    text = json.dumps(res, indent=1, default=str)
    path.write_text(re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text))
