"""Operator commands: ``backup DEST``, ``restore SRC``, ``audit verify``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli import output
from cli.options import Home, JsonOut, handle_errors, home_dir


@handle_errors
def audit_verify(
    path: Annotated[Path | None, typer.Argument(help="Log file or its folder (default: HOME/audit.log).")] = None,
    home: Home = None,  # type: ignore[assignment]
    json_out: JsonOut = False,
) -> None:
    """Check the hash chain; name the first line changed, removed or reordered (exit 1 then)."""
    from medsearch.audit import verify

    v = verify(path or home_dir(home) / "audit.log")
    if json_out:
        output.print_json(v.to_dict())
    elif v.ok:
        output.line(f"intact: {v.records} records in {len(v.files)} files; head seq {v.head_seq} sha256 {v.head_hash}")
        for n in v.notes:
            output.line(f"note: {n}")
    else:
        output.problem(f"broken: {v.problem.message}")
        output.line(f"verified up to seq {v.head_seq} ({v.records} records before the break)")
    if not v.ok:
        raise typer.Exit(1)


@handle_errors
def backup_cmd(
    dest: Annotated[Path, typer.Argument(help="New folder for the backup (must not exist, or be empty).")],
    home: Home = None,  # type: ignore[assignment]
    no_audit: Annotated[bool, typer.Option("--no-audit", help="Leave the audit log out.")] = False,
    with_links: Annotated[bool, typer.Option("--with-links", help="Include HOME/private/links.db (pseudonym -> Study Instance UID; re-identifying).")] = False,
    json_out: JsonOut = False,
) -> None:
    """Consistent copy of a home while it is served and written: catalog, served index generation, models, keys."""
    from medsearch.backup import backup

    out = backup(home_dir(home), dest, audit=not no_audit, with_links=with_links)
    if json_out:
        output.print_json(out)
        return
    gens = ", ".join(f"{m} {'/'.join(f'{s} {g}' for s, g in sp.items())}" for m, sp in out["generations"].items())
    output.line(f"backup {out['backup']}: {out['files']} files, {out['bytes'] / 1e6:.1f} MB in {out['seconds']:.1f} s"
                f"; generations: {gens or 'none'}")  # fmt: skip
    for r in out["repaired"]:
        output.line(f"rebuilt in the copy: {r}")


@handle_errors
def restore_cmd(
    src: Annotated[Path, typer.Argument(help="A folder written by `medsearch backup`.")],
    home: Home = None,  # type: ignore[assignment]
    force: Annotated[bool, typer.Option("--force", help="Move an existing home aside (HOME.before-restore-TIME) and restore.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Restore a backup into --home after checking every file's checksum; refuses a corrupt backup."""
    from medsearch.backup import restore

    out = restore(src, home_dir(home), force=force)
    if json_out:
        output.print_json(out)
        return
    output.line(f"restored {out['files']} files ({out['bytes'] / 1e6:.1f} MB) into {out['home']} in {out['seconds']:.1f} s;"
                f" check: {'consistent' if out['check']['ok'] else 'inconsistent'}")  # fmt: skip
    if out["moved_aside"]:
        output.line(f"the previous home is kept at {out['moved_aside']}; restart a running server")
