"""Hospital PACS commands: ``ingest dicomweb+http(s)://...`` (pull), ``listen`` (C-STORE receiver),
and the ``draft --sr/--stow`` output that sends a draft back as DICOM SR."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from cli import output
from cli.options import Device, Home, Model, Quiet, default_model, handle_errors, home_dir

Token = Annotated[str | None, typer.Option("--token", envvar="MEDSEARCH_DICOMWEB_TOKEN", show_envvar=True,
                                           help="Bearer token for the DICOMweb server (or user:password@ in the URL).")]  # fmt: skip


def parse_slices(value: str | None) -> int | None:
    """``--slices N|all`` -> N (>= 1) or None for all."""
    from medsearch.errors import InvalidInput

    if value is None:
        return 8
    if value.strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise InvalidInput(f"--slices {value!r} is neither a number >= 1 nor 'all'", hint="e.g. --slices 8 or --slices all")
    return n


def sync(url: str, *, home: Path | None, source: str | None, since: str | None, modality: list[str] | None,
         slices: str | None, token: str | None, link_back: bool, timeout: float, json_out: bool, quiet: bool,
         embed: bool = False) -> None:  # fmt: skip
    """`medsearch ingest dicomweb+...`: pull new studies from a PACS over DICOMweb."""
    import re

    from indexer.sources.dicomweb import DicomwebConfig, sync_dicomweb
    from medsearch.catalog import Catalog
    from medsearch.errors import InvalidInput

    if since is not None and not re.fullmatch(r"\d{8}", since):
        raise InvalidInput(f"--since {since!r} is not a date", hint="write YYYYMMDD, e.g. --since 20240101")
    cfg = DicomwebConfig(url=url, since=since, modalities=tuple(m.upper() for m in modality or ()),
                         slices=parse_slices(slices), token=token, source=source, link_back=link_back,
                         timeout=timeout)  # fmt: skip
    h = home_dir(home)
    h.mkdir(parents=True, exist_ok=True)
    cat = Catalog.open(h / "catalog.db")
    encoder = None
    if embed:  # loaded in the sync's embedding thread while the first metadata is fetched
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from medsearch.config import Paths
        from medsearch.encoders.registry import load_encoder

        model = default_model(h)
        encoder = lambda: load_encoder(model, device="auto", models_dir=Paths(h).models)  # noqa: E731
    try:
        with output.Progress(not (quiet or json_out), unit="study") as progress:
            s = sync_dicomweb(cat, h, cfg, progress=(lambda stage, n: progress.advance("sync", n)) if progress.enabled else None,
                              encoder=encoder)  # fmt: skip
    finally:
        cat.close()
    if json_out:
        output.print_json({"url": s.url, "source": s.source, **s.counts, "notes": s.notes,
                           "skipped_items": [{"item": i, "reason": r} for i, r in s.skipped]})  # fmt: skip
        return
    output.line(f"{s.url}: {s.studies_synced} studies synced, {s.studies_unchanged} unchanged of {s.studies_seen} listed; "
                f"{s.instances_fetched} of {s.instances_listed} instances fetched, {s.images_added} images and "
                f"{s.reports_added} reports added ({s.seconds:.1f}s)")  # fmt: skip
    for n in s.notes[:20]:
        output.problem(f"  note: {n}")
    for item, reason in s.skipped[:20]:
        output.problem(f"  skipped {item}: {reason}")
    if s.images_embedded:
        output.line(f"{s.images_embedded} slices embedded; next: `medsearch index` builds the indexes")
    elif s.images_added:
        output.line("next: `medsearch index` embeds the new slices")


@handle_errors
def listen(
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; a hospital network needs an explicit address).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="DICOM port.")] = 11112,
    ae_title: Annotated[str, typer.Option("--ae-title", help="This receiver's AE title.")] = "MEDSEARCH",
    index_every: Annotated[float, typer.Option("--index-every", min=1, help="Seconds between ingest+index rounds.")] = 30,
    source: Annotated[str | None, typer.Option(help="Source name of received studies (default: listen-AETITLE).")] = None,
    link_back: Annotated[bool, typer.Option("--link-back", help="Keep pseudonym -> Study Instance UID in HOME/private/links.db (admin viewer links).")] = False,
    fsync: Annotated[bool, typer.Option("--fsync/--no-fsync", help="fsync each spool entry before acknowledging it (survives a power loss); --no-fsync survives a kill only, ~2x the instances/s.")] = True,
    home: Home = None,  # type: ignore[assignment]
    model: Model = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """DICOM C-STORE receiver (with C-ECHO): de-identify in memory, spool crash-safely, ingest and index in rounds.

    A running `medsearch serve` on the same home picks up each new index generation by itself.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import logging

    from indexer.embed import run_index
    from indexer.listen import ListenConfig, Listener, serve_forever
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, Paths
    from medsearch.encoders.registry import load_encoder

    h = home_dir(home)
    h.mkdir(parents=True, exist_ok=True)
    Catalog.open(h / "catalog.db").close()
    paths = Paths(h)
    enc = load_encoder(model or default_model(h), device=device, models_dir=paths.models)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def index(cat: Catalog) -> Any:
        return run_index(cat, enc, paths, config=EmbedConfig(workers=0), progress=False)

    cfg = ListenConfig(host=host, port=port, ae_title=ae_title, index_every=index_every, source=source,
                       link_back=link_back, fsync=fsync)  # fmt: skip
    listener = Listener(h, cfg, index=index)
    output.line(f"medsearch listening on {host}:{port} as {ae_title} (model {enc.model_id}); index every "
                f"{index_every:g} s; Ctrl-C stops after ingesting what is spooled", err=True)  # fmt: skip
    serve_forever(listener)
    st = listener.stats
    output.line(f"received {st.received}, spooled {st.spooled}, ingested {st.ingested}, refused {sum(st.refused.values())}"
                + (f" ({', '.join(f'{k} {v}' for k, v in st.refused.items())})" if st.refused else ""), err=True)


def write_sr_for(draft: Any, image: str, sr_path: Path | None, stow_url: str | None, token: str | None) -> str | None:
    """`draft --sr FILE [--stow URL]`: the draft as a Basic Text SR referencing the query study."""
    import pydicom

    from indexer.sources.dicomweb import stow
    from medsearch.errors import InvalidInput
    from medsearch.rag.sr import draft_to_sr, write_sr

    p = Path(image)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    headers = []
    for f in files:
        try:
            headers.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception:  # not DICOM: not a query file to reference
            continue
    if not headers:
        raise InvalidInput(f"{image}: no DICOM file to reference", hint="--sr/--stow need a DICOM file or study folder")
    ds = draft_to_sr(draft, headers)
    if sr_path is not None:
        write_sr(ds, str(sr_path))
    if stow_url:
        stow(stow_url, [ds], token=token)
    return str(sr_path) if sr_path else None
