"""Rendering a retrieval report (``eval.retrieval.evaluate_retrieval``): headline rows, markdown, Recall@K plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from medsearch.errors import InvalidInput

TARGETS = {  # medpix-2.0 dev, pool = dev images, selection on train folds only (issue 13)
    "caption->image R@10": 0.60,
    "caption->same-case R@10": 0.85,
    "modality_type accuracy (kNN vote)": 0.95,
    "body_region accuracy (kNN vote)": 0.90,
}


def headline(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the summary table: metric, model value + CI, towers baseline, chance, target."""
    rows: list[dict[str, Any]] = []

    def val(d: dict[str, Any] | None) -> tuple[Any, Any]:
        return (d or {}).get("value"), tuple((d or {}).get("ci95") or (None, None))

    cm = report.get("cross-modal", {})
    for name in ("caption->image", "caption->same-case", "caption->case", "image->caption"):
        if name in cm:
            for k in report["config"]["ks"]:
                v, ci = val(cm[name][f"R@{k}"])
                rows.append({"metric": f"{name} R@{k}", "value": v, "ci95": ci, "towers": None,
                             "chance": cm[name][f"chance R@{k}"], "target": TARGETS.get(f"{name} R@{k}")})  # fmt: skip
            v, ci = val(cm[name]["median rank"])
            rows.append({"metric": f"{name} median rank", "value": v, "ci95": ci, "towers": None, "chance": None,
                         "target": None})  # fmt: skip
    fm = report.get("findings->same case R@10", {})
    tw = (fm.get("towers text") or {}).get("R@10", {}).get("value")
    for mode in ("image", "text", "bm25", "hybrid"):
        if mode in fm:
            v, ci = val(fm[mode]["R@10"])
            rows.append({"metric": f"findings->same case R@10 ({mode})", "value": v, "ci95": ci,
                         "towers": tw if mode == "text" else None, "chance": fm[mode]["chance R@10"], "target": None})  # fmt: skip
    ii = report["image->image"]
    for name, d in ii["model"].items():
        for m in ("P@10", "mAP"):
            v, ci = val(d[m])
            t = (ii.get("towers", {}).get(name) or {}).get(m, {}).get("value")
            rows.append({"metric": f"image->image {m} {name}", "value": v, "ci95": ci, "towers": t,
                         "chance": d["chance P@10"] if m == "P@10" else None,
                         "target": TARGETS.get(f"image->image {m} {name}")})  # fmt: skip
    cl = report["classification"]
    for name, d in cl["model"].items():
        for how in ("kNN vote", "zero-shot"):
            if how in d:
                v, ci = val(d[how])
                t = (cl.get("towers", {}).get(name) or {}).get(how, {}).get("value") if how == "kNN vote" else None
                rows.append({"metric": f"{name} accuracy ({how})", "value": v, "ci95": ci, "towers": t,
                             "chance": d["chance (majority class)"], "target": TARGETS.get(f"{name} accuracy ({how})")})  # fmt: skip
    return rows


def markdown(report: dict[str, Any]) -> str:
    """A markdown table of ``headline(report)`` with the pool and the duplicate-caption note."""

    def f(x: Any) -> str:
        if x is None:
            return "-"
        if isinstance(x, float) and math.isinf(x):
            return "inf"
        return f"{x:.3f}" if isinstance(x, float) and abs(x) < 10 else f"{x:g}"

    p = report["pool"]
    lines = [
        f"### Retrieval: model `{report['model']}`, split `{report['split']}`"
        + (f", source `{report['source']}`" if report.get("source") else ""),
        "",
        f"Pool: {p['kind']} = {p['images']} images of {p['cases']} cases; {p['query images']} query images, "
        f"{p['query cases with findings']} query cases with findings.",
        "",
        "| metric | model [95% CI] | frozen towers | chance | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in headline(report):
        lo, hi = r["ci95"]
        ci = f" [{f(lo)}, {f(hi)}]" if lo is not None else ""
        target = f">= {r['target']:.2f}" if r["target"] is not None else ""
        if target and r["value"] is not None:
            target += " ✓" if r["value"] >= r["target"] else " ✗"
        lines.append(f"| {r['metric']} | {f(r['value'])}{ci} | {f(r['towers'])} | {f(r['chance'])} | {target} |")
    notes = [report["conventions"]]
    if report.get("cross-modal", {}).get("levels"):
        notes.append("Levels: " + report["cross-modal"]["levels"] + ".")
    if report.get("cross-modal", {}).get("duplicates"):
        notes.append("Duplicate captions: " + report["cross-modal"]["duplicates"] + ".")
    if report.get("findings->same case R@10", {}).get("note"):
        notes.append("Findings: " + report["findings->same case R@10"]["note"] + ".")
    notes.append(
        "Chance for accuracy = always predicting the pool's majority class; 'frozen towers' = EfficientNet-"
        "Lite0 image features (image->image, kNN) and MiniLM text features (text mode), no training."
    )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def plot_recall_curves(report: dict[str, Any], path: Path) -> Path:
    """PNG of Recall@K curves (K = 1..curve_k) for every ranked task of ``report``, chance dashed."""
    try:
        import matplotlib
    except ImportError as e:
        raise InvalidInput("--plot needs matplotlib, which is not installed", hint="pip install 'medsearch[eval]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, dict[str, dict[str, Any]]]] = []
    cm = report.get("cross-modal", {})
    if cm:
        panels.append(("cross-modal", {k: v for k, v in cm.items() if isinstance(v, dict)}))
    fm = report.get("findings->same case R@10", {})
    if fm:
        panels.append(("findings -> same case", {k: v for k, v in fm.items() if isinstance(v, dict)}))
    if not panels:
        raise InvalidInput("the report has no ranked task to plot", hint="evaluate a model with texts and images")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels, strict=True):
        for i, (name, d) in enumerate(curves.items()):
            ks = np.arange(1, len(d["curve"]) + 1)
            line = ax.plot(ks, d["curve"], label=name, color=f"C{i}")[0]
            ax.plot(ks, d["chance curve"], linestyle=":", color=line.get_color(), alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="lower right")
    p = report["pool"]
    fig.suptitle(f"{report['model']} on {report['split']} (pool: {p['kind']}, {p['images']} images); dotted = chance")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
