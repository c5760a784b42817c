"""All CLI printing: JSON, hit lists, case and key tables, errors, and the one progress adapter.

Results go to stdout; progress, notes and errors to stderr, so ``--json`` output can be piped.
Records are read by attribute (``Hit``) or key (dicts) only: nothing here imports medsearch.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

import typer


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def line(text: str = "", *, err: bool = False) -> None:
    typer.echo(text, err=err)


def heading(text: str) -> None:
    typer.secho(text, bold=True)


def warn(text: str) -> None:
    typer.secho(text, fg=typer.colors.YELLOW, err=True)


def ok(text: str) -> None:
    typer.secho(text, fg=typer.colors.GREEN)


def problem(text: str) -> None:
    typer.secho(text, fg=typer.colors.YELLOW)


def print_error(e: Any, *, as_json: bool = False) -> None:
    """A ``MedsearchError``: ``{"error": {code, message, hint}}`` on stdout with --json (the API's
    shape), else a red ``error [code]: message`` and a ``hint:`` line on stderr."""
    if as_json:
        print_json({"error": e.to_dict()})
        return
    typer.secho(f"error [{e.code}]: {e.message}", fg=typer.colors.RED, err=True)
    if e.hint:
        typer.secho(f"hint: {e.hint}", fg=typer.colors.RED, err=True)


def print_hits(hits: list, title: str) -> None:
    """Ranked hits, one line each (score, case, image, modality/region/plane, diagnosis) + excerpt."""
    if not hits:
        typer.echo(f"{title}: no results")
        return
    heading(title)
    for rank, h in enumerate(hits, 1):
        dx = h.diagnosis or h.title or "-"
        where = " ".join(x for x in (h.modality_type, h.body_region, h.plane) if x) or "-"
        typer.echo(f"{rank:>3}. {h.score:6.3f}  {h.case_key:<14} {h.image_key or '-':<28} {where:<24} {dx}")
        if h.excerpt:
            ex = " ".join(h.excerpt.split())
            typer.echo(f"       {ex[:140] + ('…' if len(ex) > 140 else '')}")


def print_case(cv: Any, series: list[dict[str, Any]] = ()) -> None:
    """One case: header, report sections, its DICOM series, then its images."""
    heading(f"{cv.case_key} ({cv.source}, split {cv.split}): {cv.title or ''}")
    typer.echo(f"diagnosis: {cv.diagnosis or '-'}   category: {cv.category or '-'}")
    for name, text in cv.sections.items():
        heading(f"\n{name.upper()}")
        typer.echo(text)
    for sr in series:
        n_emb = sum(1 for sl in sr["slices"] if sl["status"] == "ok")
        heading(f"\nSERIES {sr['number'] if sr['number'] is not None else '-'}: {sr['modality'] or '-'} "
                f"{sr['plane'] or '-'}, {sr['slice_count']} slices ({n_emb} embedded), ordered by {sr['ordered_by']}")
    heading("\nIMAGES")
    for im in cv.images:
        typer.echo(f"  {im['image_id']:>6} {im['key']:<28} {im['modality_type'] or '-':<6} {im['plane'] or '-':<10} "
                   f"{im['caption'] or ''}")  # fmt: skip


def print_mapping(data: dict[str, Any]) -> None:
    for key, value in data.items():
        typer.echo(f"{key}: {value}")


def print_keys(keys: Iterable[Any]) -> None:
    keys = list(keys)
    if not keys:
        typer.echo("no keys; create one with `medsearch keys add --scope admin`")
    for k in keys:
        state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
        if k.active and k.rotated_at:
            state += f", rotated {k.rotated_at}" + (f" (old secret until {k.previous_expires_at})" if k.previous_expires_at else "")
        typer.echo(f"{k.id}  {k.scope:<5}  {k.name:<24} created {k.created_at}  {state}")


class Progress:
    """The one progress adapter: tqdm bars on stderr, ONE bar per stage, created on its first update.

    Use as a context manager (closes every bar, also on errors). Callbacks for the library:
    ``progress(stage, done, total)`` (train, eval), ``progress.stage(name)`` -> ``(done, total)``
    (eval drafts), ``progress.ticker(name)`` -> ``(item)`` (ingest: one call per item).
    Disabled (``enabled=False``, e.g. with --json or --quiet) every call is a no-op.
    """

    def __init__(self, enabled: bool = True, *, unit: str = "it", leave: bool = True) -> None:
        self.enabled = enabled
        self.unit = unit
        self.leave = leave
        self._bars: dict[str, Any] = {}

    def _bar(self, stage: str, total: int | None) -> Any:
        bar = self._bars.get(stage)
        if bar is None:
            from tqdm import tqdm

            bar = self._bars[stage] = tqdm(total=total, desc=stage, unit=self.unit, dynamic_ncols=True,
                                           file=sys.stderr, leave=self.leave)  # fmt: skip
        return bar

    def __call__(self, stage: str, done: int, total: int | None = None) -> None:
        """``done`` of ``total`` items of ``stage`` are finished (absolute counts)."""
        if not self.enabled:
            return
        bar = self._bar(stage, total)
        if total is not None and bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    def advance(self, stage: str, n: int = 1) -> None:
        """``n`` more items of ``stage`` are finished (relative)."""
        if self.enabled:
            self._bar(stage, None).update(n)

    def stage(self, name: str):
        """A ``(done, total)`` callback for one stage."""
        return lambda done, total: self(name, done, total)

    def ticker(self, name: str):
        """A one-argument callback that counts calls (one per item)."""
        return lambda _item=None: self.advance(name)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
