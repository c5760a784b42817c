"""Query commands: ``search`` (text), ``similar`` (image), ``case`` and ``draft``.

Each calls one library method on a ``Searcher``/``Drafter`` and hands the records to cli.output.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli import output
from cli.options import (
    Device,
    Home,
    ImageRef,
    JsonOut,
    K,
    Modality,
    Model,
    Region,
    Split,
    draft_options,
    filters,
    handle_errors,
    home_dir,
    searcher,
)

if TYPE_CHECKING:
    from medsearch.rag.config import DraftConfig


@handle_errors
def search(
    query: Annotated[str, typer.Argument(help='Text, e.g. "left lower lobe consolidation".')],
    home: Home = None,  # type: ignore[assignment]
    k: K = 10,
    modality: Modality = None,
    body_region: Region = None,
    split: Split = None,
    mode: Annotated[str, typer.Option(help="auto/hybrid (RRF of all available), image (cross-modal), text (report/caption vectors), bm25 (report/caption words).")] = "auto",
    all_images: Annotated[bool, typer.Option("--all-images", help="Several images per case.")] = False,
    reports: Annotated[bool, typer.Option("--reports", help="Return cases by report text.")] = False,
    understand: Annotated[bool, typer.Option("--understand/--no-understand", help="Read modality, plane, body region, contrast from the query and rank matching images higher (never a filter).")] = True,
    model: Model = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Text -> matching images and cases."""
    s = searcher(home, model, device)
    f = filters(modality, body_region, split)
    u = None
    if reports:
        hits = s.search_reports(query, k=k, filters=f)
    else:
        u = s.understand(query) if understand else None
        hits = s.search_text(query, k=k, filters=f, per_case=not all_images, mode=mode, understand=u or False)
    if json_out:  # the list of hits, as before (the API's response carries the understood object)
        output.print_json([h.to_dict() for h in hits])
    else:
        if u is not None:
            output.line(f"understood: {u.summary() or '(nothing)'}")
        output.print_hits(hits, f'"{query}"')


@handle_errors
def similar(
    image: Annotated[str, typer.Argument(help="Image file (PNG/JPEG/DICOM), a study folder, or a catalog image id or key.")],
    home: Home = None,  # type: ignore[assignment]
    k: K = 10,
    modality: Modality = None,
    body_region: Region = None,
    split: Split = None,
    exclude_own_case: Annotated[bool, typer.Option("--exclude-own-case", help="Leave out the query image's own case.")] = False,
    all_images: Annotated[bool, typer.Option("--all-images", help="Several images per case.")] = False,
    slices: Annotated[str, typer.Option("--slices", help="Study folder: query slices per series (N or all).")] = "8",
    model: Model = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Image -> the most similar prior images and cases; a study folder -> one hit per prior study.

    A study is scored by the mean over its query slices of the best cosine similarity to any slice
    of the prior study; the query's own study is left out when it is in the catalog.
    """
    s = searcher(home, model, device)
    if Path(image).is_dir():
        from cli.commands.pacs import parse_slices
        from indexer.sources.query import query_study
        from medsearch.imaging import load_image

        study_key, chosen, _ = query_study(Path(image), s.catalog.salt, slices=parse_slices(slices), config=s.imaging)
        pils = [load_image(p, frame=f, config=s.imaging) for p, f in chosen]
        hits = s.similar_study(pils, k=k, filters=filters(modality, body_region, split), own_study_key=study_key)
        if json_out:
            output.print_json([h.to_dict() for h in hits])
        else:
            output.print_hits(hits, f"studies similar to {image} ({len(chosen)} query slices)")
        return
    hits = s.similar(
        image, k=k, filters=filters(modality, body_region, split), per_case=not all_images,
        exclude_same_case=exclude_own_case,
    )  # fmt: skip
    if json_out:
        output.print_json([h.to_dict() for h in hits])
    else:
        output.print_hits(hits, f"similar to {image}")


@handle_errors
def case(
    ref: Annotated[str, typer.Argument(help="Case id or key (e.g. MPX1007).")],
    home: Home = None,  # type: ignore[assignment]
    json_out: JsonOut = False,
) -> None:
    """Show one case: report sections, labels and images."""
    from dataclasses import asdict

    from medsearch.catalog import Catalog

    cat = Catalog.open(home_dir(home) / "catalog.db", create=False)
    try:
        cv = cat.get_case(ref)
        series = cat.case_series(cv.case_id, cat.get_meta("default_model"))
    finally:
        cat.close()
    if json_out:
        output.print_json({**asdict(cv), "series": series})
    else:
        output.print_case(cv, series)


@handle_errors
@draft_options
def draft(
    image: ImageRef,
    home: Home = None,  # type: ignore[assignment]
    generator: Annotated[str, typer.Option("--generator", "-g", help="extractive (no LLM), openai, llama-cpp, transformers.")] = "extractive",
    k_max: Annotated[int, typer.Option("--k-max", min=1, max=50, help="Most evidence cases (fewer after a similarity drop).")] = 8,
    split: Split = None,
    modality: Modality = None,
    body_region: Region = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Do not stream LLM tokens to stderr.")] = False,
    model: Model = None,
    device: Device = "auto",
    json_out: JsonOut = False,
    sr: Annotated[Path | None, typer.Option("--sr", help="Also write the draft as a DICOM Basic Text SR (UNVERIFIED) referencing the query study.")] = None,
    stow: Annotated[str | None, typer.Option("--stow", help="Send the SR to this PACS over STOW-RS (dicomweb+http(s)://HOST:PORT/dicom-web).")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="MEDSEARCH_DICOMWEB_TOKEN", help="Bearer token for --stow.")] = None,
    *,
    draft: DraftConfig,
) -> None:
    """Draft a report for an image from similar prior cases; every sentence cites its evidence [C<n>].

    With --sr/--stow the query must be DICOM: the SR references its study with the UIDs of the query files."""
    from dataclasses import replace

    from medsearch.rag import Drafter, EvidenceConfig
    from medsearch.rag.render import draft_to_dict, draft_to_markdown

    cfg = replace(draft, generator=generator, evidence=EvidenceConfig(k_max=k_max))
    drafter = Drafter(searcher(home, model, device), config=cfg)
    streamed = []

    def on_token(piece: str) -> None:
        if not streamed:
            typer.secho(f"[{drafter.generator.name} {drafter.generator.model}] ", err=True, nl=False, dim=True)
        streamed.append(piece)
        typer.echo(piece, err=True, nl=False)

    stream = generator != "extractive" and not json_out and not no_stream
    d = drafter.draft(image, filters=filters(modality, body_region, split), on_token=on_token if stream else None)
    if streamed:
        output.line(err=True)
    if sr is not None or stow:
        from cli.commands.pacs import write_sr_for

        write_sr_for(d, str(image), sr, stow, token)
        output.line(f"SR written{f' to {sr}' if sr else ''}{f' and sent to {stow}' if stow else ''} (UNVERIFIED draft)", err=True)
    if json_out:
        output.print_json(draft_to_dict(d))
        return
    output.line(draft_to_markdown(d))
    if d.fallback_from:
        output.warn(f"note: {d.fallback_from} failed ({d.fallback_reason}); drafted with extractive")
