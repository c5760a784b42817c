"""Archive commands: ``ingest``, ``index``, ``info``, ``check`` and ``audit-phi``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cli import output
from cli.commands import pacs
from cli.options import Device, Home, JsonOut, Model, Quiet, Split, default_model, handle_errors, home_dir


@handle_errors
def ingest(
    path: Annotated[str, typer.Argument(help="Dataset folder (JSONL layout), image folder, DICOM tree, one file, or a PACS: dicomweb+http(s)://HOST:PORT/dicom-web.")],
    home: Home = None,  # type: ignore[assignment]
    split: Split = None,
    source: Annotated[str | None, typer.Option(help="Source name stored with each row (default: folder name).")] = None,
    sidecar: Annotated[Path | None, typer.Option(help="CSV/JSONL of reports for an image folder.")] = None,
    deid_text: Annotated[bool, typer.Option("--deid-text", help="Scrub names, dates, phone numbers, MRNs from dataset and sidecar report text (SR/RIS text is always scrubbed unless --no-deid-text).")] = False,
    reports: Annotated[Path | None, typer.Option("--reports", help="RIS export (CSV or JSONL) joined to DICOM studies by accession_number or study_instance_uid; the key is never stored.")] = None,
    no_deid_text: Annotated[bool, typer.Option("--no-deid-text", help="Keep DICOM SR / RIS report text as written (no scrubbing).")] = False,
    chunk: Annotated[int, typer.Option(min=1, help="Items per catalog transaction (a crash redoes at most these).")] = 256,
    since: Annotated[str | None, typer.Option(help="PACS: studies from this date on (YYYYMMDD); default: where the last sync stopped.")] = None,
    modality: Annotated[list[str] | None, typer.Option("--modality", help="PACS: only studies with this modality (repeatable).")] = None,
    slices: Annotated[str | None, typer.Option("--slices", help="DICOM and PACS: slices to embed per series, N spread over its extent, or all (default 8); the rest stay catalogued for a later --slices all.")] = None,
    token: pacs.Token = None,
    link_back: Annotated[bool, typer.Option("--link-back", help="PACS: keep pseudonym -> Study Instance UID in HOME/private/links.db (admin viewer links).")] = False,
    timeout: Annotated[float, typer.Option(min=1, help="PACS: seconds per HTTP request before a retry.")] = 30,
    embed: Annotated[bool, typer.Option("--embed", help="PACS: embed each slice during the sync, from its pixels in memory, with the home's default model (`medsearch index` then only builds the indexes).")] = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Add cases, images and reports to the catalog (idempotent: a second run adds nothing).

    PATH may be a PACS (dicomweb+http://HOST:PORT/dicom-web): new studies are pulled over DICOMweb."""
    from indexer.ingest import ingest_path
    from indexer.sources.dicomweb import is_dicomweb
    from medsearch.catalog import Catalog
    from medsearch.errors import InvalidInput

    if is_dicomweb(path):
        pacs.sync(path, home=home, source=source, since=since, modality=modality, slices=slices, token=token,
                  link_back=link_back, timeout=timeout, json_out=json_out, quiet=quiet, embed=embed)  # fmt: skip
        return
    path = Path(path)
    if not path.exists():  # before the catalog is created, so a typo leaves no empty home behind
        raise InvalidInput(f"{path} does not exist", hint="give a dataset folder, image folder, DICOM tree or file")
    n_slices = pacs.parse_slices(slices)
    h = home_dir(home)
    cat = Catalog.open(h / "catalog.db")
    try:
        with output.Progress(not (quiet or json_out), unit="item") as progress:
            summary = ingest_path(
                cat, path, source=source, splits=split, sidecar=sidecar, deid_text=deid_text, chunk=chunk,
                progress=progress.ticker(f"ingest {path.name}") if progress.enabled else None, slices=n_slices,
                reports=reports, deid_reports=not no_deid_text,
            )  # fmt: skip
    finally:
        cat.close()
    if json_out:
        output.print_json(summary.to_dict())
        return
    c = summary.counts
    output.line(
        f"{path}: {c['cases_added']} cases and {c['images_added']} images added, "
        f"{c['cases_updated'] + c['images_updated']} updated, {c['unchanged']} unchanged, "
        f"{c['skipped']} skipped ({summary.seconds:.1f}s)"
    )
    if summary.series_added or summary.series_updated or summary.slices_deferred:
        output.line(
            f"  {summary.series_added} series added, {summary.series_updated} updated; {summary.slices_selected} slices "
            f"to embed, {summary.slices_deferred} catalogued without a vector (--slices all adds them)"
        )
    if summary.reports:
        got = ", ".join(f"{n} from {'DICOM SR' if k == 'sr' else 'the RIS export'}" for k, n in summary.reports.items()
                        if k in ("sr", "ris"))  # fmt: skip
        scrubbed = summary.reports.get("scrubbed", 0)
        output.line(f"  reports: {got}; {scrubbed} scrubbed of identifiers" + ("" if scrubbed else " (--no-deid-text)"))
    if reports is not None:
        output.line(f"  RIS export: {len(summary.reports_unmatched)} rows matched no study"
                    + (f" ({', '.join(summary.reports_unmatched[:10])}{' ...' if len(summary.reports_unmatched) > 10 else ''})"
                       if summary.reports_unmatched else ""))  # fmt: skip
    for n in summary.notes[:20]:
        output.problem(f"  note {n.item}: {n.message}")
    if summary.filtered:
        output.line(f"  {summary.filtered} left out by --split")
    for s in summary.skipped[:20]:
        output.problem(f"  skipped {s.item}: {s.reason}")
    if len(summary.skipped) > 20:
        output.line(f"  ... and {len(summary.skipped) - 20} more (see --json)")


@handle_errors
def index(
    home: Home = None,  # type: ignore[assignment]
    model: Model = None,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(min=0, help="Images per batch; 0 = auto (16 on CPU, 256 on CUDA).")] = 0,
    workers: Annotated[int, typer.Option(min=-1, help="Worker processes; -1 = auto (CPU: one per core, each decodes and encodes; CUDA: cores-1 decoders, up to 16).")] = -1,
    torch_threads: Annotated[int, typer.Option(min=0, help="Encoder threads while embedding; 0 = torch's default.")] = 0,
    kind: Annotated[str, typer.Option(help="FAISS index kind: auto (flat up to 100k vectors, then ivfpq), flat, hnsw, ivfpq.")] = "auto",
    target_recall: Annotated[float, typer.Option(min=0.5, max=1.0, help="Recall@10 the ANN search knobs are tuned to.")] = 0.95,
    engine: Annotated[str, typer.Option(help="local (DataLoader workers) or ray (Ray Data actor pool, one per device).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join (e.g. auto, ray://head:10001); default: a local Ray.")] = None,
    actors: Annotated[int, typer.Option(min=0, help="Ray actors; 0 = one per GPU, else one per 2 CPUs.")] = 0,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild indexes and retry failed images.")] = False,
    commit_every: Annotated[int, typer.Option(min=1, help="Vectors per catalog commit (a crash loses at most these).")] = 512,
    store: Annotated[str | None, typer.Option(help="Vector store: faiss (embedded, the default) or milvus; default: the one this home used last.")] = None,
    milvus_uri: Annotated[str | None, typer.Option(help="Milvus to use: a file (Milvus Lite; default HOME/milvus.db) or http://host:19530.")] = None,
    milvus_token: Annotated[str | None, typer.Option(envvar="MEDSEARCH_MILVUS_TOKEN", help="Milvus token (user:password or API key); kept in the home's catalog.")] = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Embed what is not embedded yet and build/update the FAISS indexes or Milvus collections (resumable)."""
    # Sleeping (not spinning) OpenMP threads: on a shared 2-core host the encoder ran 0.4-0.8
    # images/s with spinning threads and 11-50 with passive ones (benchmarks/embed_throughput.py).
    # Must be set before torch is imported; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from indexer.embed import run_index
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, IndexConfig, Paths
    from medsearch.encoders.registry import load_encoder
    from medsearch.errors import InvalidInput

    kinds = ("auto", "flat", "hnsw", "ivfpq") + (("ivf_flat", "ivf_sq8") if store == "milvus" else ())
    if kind not in kinds:
        raise InvalidInput(f"unknown index kind {kind!r}", hint=f"use one of: {', '.join(kinds)}")
    if milvus_uri and "://" not in milvus_uri:
        milvus_uri = str(Path(milvus_uri).expanduser().resolve())  # a Milvus Lite file: absolute, whatever the cwd
    if engine not in ("local", "ray"):
        raise InvalidInput(f"unknown engine {engine!r}", hint="use local or ray")
    h = home_dir(home)
    cat = Catalog.open(h / "catalog.db", create=False)
    spec = model or default_model(h)
    try:
        enc = load_encoder(spec, device=device, models_dir=h / "models")
        stage = None
        if engine == "ray":
            from indexer.distributed import ray_image_stage

            shard_dir = h / "shards" / Paths(h).index_dir(enc.model_id).name  # vector shards the actors write
            stage = ray_image_stage(spec=spec, models_dir=h / "models", shard_dir=shard_dir, actors=actors,
                                    address=ray_address)  # fmt: skip
        summary = run_index(
            cat, enc, Paths(h),
            config=EmbedConfig(batch_size=batch_size, workers=workers, commit_every=commit_every, torch_threads=torch_threads),
            index_config=IndexConfig(kind=kind, target_recall=target_recall), progress=not (quiet or json_out),
            rebuild=rebuild, image_stage=stage, store=store, milvus_uri=milvus_uri, milvus_token=milvus_token,
        )  # fmt: skip
    finally:
        cat.close()
    if json_out:
        output.print_json(summary.to_dict())
        return
    output.line(
        f"model {enc.model_id} on {enc.device}: {summary.images_embedded} images "
        f"({summary.images_per_s:.1f}/s), {summary.texts_embedded} texts embedded"
    )
    for space, info in summary.indexes.items():
        state = "rebuilt" if info["rebuilt"] else (f"updated, +{info['added']}" if info.get("added") else "up to date")
        output.line(f"  {space} index: {info['count']} vectors, {info['kind']}, generation {info['generation']} ({state})")
        if info.get("target_met") is False:
            other = (", or with a Milvus server (HNSW tuned to the target)" if info.get("store") == "milvus"
                     else ", or as HNSW (--kind hnsw)" if info["kind"] != "hnsw" else "")  # fmt: skip
            output.problem(f"  {space} index: recall@10 {info['tuned_recall_at_10']} on held-out stored vectors is below the "
                           f"target {info['target_recall']}: rebuild exact (--kind flat){other}")  # fmt: skip
    for image_id, reason in summary.images_failed[:20]:
        output.problem(f"  image {image_id} failed: {reason}")




@handle_errors
def info(home: Home = None, json_out: JsonOut = False) -> None:  # type: ignore[assignment]
    """Counts of the catalog, stored vectors and indexes in a home."""
    from medsearch.catalog import Catalog

    h = home_dir(home)
    cat = Catalog.open(h / "catalog.db", create=False)
    data = {
        "home": str(h),
        **cat.counts(),
        "vectors": [{"model": m, "space": s, "count": n} for m, s, n in cat.vector_models()],
        "default_model": cat.get_meta("default_model"),
        "modalities": dict(cat.distinct("modality")),
        "body_regions": dict(cat.distinct("body_region")),
        "splits": dict(cat.distinct("split")),
    }
    if json_out:
        output.print_json(data)
        return
    for key, value in data.items():
        output.line(f"{key}: {value}")


@handle_errors
def check(
    home: Home = None,  # type: ignore[assignment]
    repair: Annotated[bool, typer.Option("--repair", help="Rebuild broken indexes from stored vectors; embed rows whose vectors are gone.")] = False,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Verify that catalog, stored vectors, FAISS indexes and manifests agree."""
    from medsearch.catalog import Catalog
    from medsearch.config import Paths
    from medsearch.consistency import check_home

    h = home_dir(home)
    cat = Catalog.open(h / "catalog.db", create=False)
    try:
        report = check_home(cat, Paths(h), repair=repair)
        models = sorted({e["model"] for e in report["indexes"] if e.get("not_embedded")})
        if repair and models:  # vectors are gone: only the encoder can make them again
            from indexer.embed import run_index
            from medsearch.config import EmbedConfig
            from medsearch.encoders.registry import load_encoder

            done = report["repaired"]
            for m in models:
                enc = load_encoder(m, device=device, models_dir=h / "models")
                s = run_index(cat, enc, Paths(h), config=EmbedConfig(workers=0), progress=False)
                done.append(f"embedded {s.images_embedded} images and {s.texts_embedded} texts of {m} that had no vector")
            report = {**check_home(cat, Paths(h)), "repaired": done}
    finally:
        cat.close()
    if json_out:
        output.print_json(report)
    else:
        for p in report["problems"]:
            output.problem(f"problem: {p}")
        for r in report["repaired"]:
            output.ok(f"repaired: {r}")
        for e in report["indexes"]:
            if e.get("not_embedded"):
                output.line(f"pending: {e['not_embedded']} {e['space']} rows have no {e['model']} vector yet (run `medsearch index`)")
        output.line("consistent" if report["ok"] else "inconsistent: run `medsearch check --repair`")
    if not report["ok"]:
        raise typer.Exit(1)


@handle_errors
def audit_phi(
    home: Home = None,  # type: ignore[assignment]
    examples: Annotated[int, typer.Option(min=0, max=50, help="Redacted examples to show per kind.")] = 3,
    json_out: JsonOut = False,
) -> None:
    """Scan the catalog (reports, captions, metadata, labels, file names) for PHI-like content; exit 1 if any."""
    from medsearch.catalog import Catalog
    from medsearch.phi_audit import audit_phi as run_audit

    h = home_dir(home)
    cat = Catalog.open(h / "catalog.db", create=False, readonly=True)
    try:
        report = run_audit(cat, examples=examples)
    finally:
        cat.close()
    from medsearch.catalog.links import link_status

    report["link_back"] = link_status(h)  # the optional pseudonym -> Study Instance UID file (re-identifying)
    if json_out:
        output.print_json(report)
    else:
        sc = report["scanned"]
        output.line(f"PHI audit of {h}: {sc['cases']} cases, {sc['images']} images, {sc['labels']} labels, "
                   f"{sc['chars']:,} characters scanned")  # fmt: skip
        for kind, k in report["kinds"].items():
            if not k["count"]:
                continue
            where = ", ".join(f"{f} ({n})" for f, n in list(k["where"].items())[:4])
            output.problem(f"{kind:<14} {k['count']:>7}  {where}")
            for ex in k["examples"]:
                output.line(f"{'':<24}{ex['where']} {ex['field']}: {ex['text']}")
        for src, c in report.get("report_sources", {}).items():
            output.line(f"reports from {'DICOM SR' if src == 'sr' else 'RIS export' if src == 'ris' else src}: "
                        f"{c['cases']} cases, {c['scrubbed']} scrubbed")  # fmt: skip
        lb = report["link_back"]
        output.line(f"link back: {lb['path']} maps {lb['studies']} studies to their Study Instance UIDs (admin only)"
                    if lb["exists"] else "link back: none (no file maps pseudonyms to UIDs)")  # fmt: skip
        if report["findings"]:
            output.line(f"{report['findings']} PHI-like spans: review them; `medsearch ingest --deid-text` scrubs report text")
        else:
            output.line("no PHI-like content found")
    if report["findings"]:
        raise typer.Exit(1)



@handle_errors
def remove(
    home: Home = None,  # type: ignore[assignment]
    case: Annotated[str | None, typer.Option("--case", help="Case id, key or source:key to erase.")] = None,
    patient: Annotated[str | None, typer.Option("--patient", help="Patient key (or the DICOM PatientID) whose cases to erase.")] = None,
    source: Annotated[str | None, typer.Option("--source", help="Source name whose cases to erase.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be erased.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Erase a case, a patient or a source: rows, vectors, texts, index entries, BM25 terms, spool files.

    Crash-safe (a rerun finishes an interrupted erasure) and audit-logged without the key.
    """
    from medsearch.catalog import Catalog
    from medsearch.config import Paths
    from medsearch.erasure import remove as run_remove

    h = home_dir(home)
    cat = Catalog.open(h / "catalog.db", create=False)
    try:
        out = run_remove(cat, Paths(h), case=case, patient=patient, source=source, dry_run=dry_run, actor="cli")
    finally:
        cat.close()
    if json_out:
        output.print_json(out)
        return
    verb = "would erase" if dry_run else "erased"
    output.line(f"{verb} {out['cases']} cases, {out['images']} images, {out['texts']} texts, {out['files']} home files")
    if out["resumed"]:
        output.line(f"finished {out['resumed']} interrupted erasure(s) first")
