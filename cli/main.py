"""medsearch command line: a thin typer shell over the library.

This module only wires the commands into one app (``medsearch = "cli.main:app"``). They live in
``cli/commands/`` (archive, query, evaluate, server) and ``cli/demo.py``; shared options in
``cli/options.py``; all printing, and the progress bars, in ``cli/output.py``. Each command calls
one library function and turns a ``MedsearchError`` into one clear message with the next step
(exit code 2). Heavy modules are imported inside the commands so ``medsearch --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

from cli import demo as demo_cmd
from cli.commands import admin, archive, evaluate, pacs, query, server

app = typer.Typer(
    name="medsearch",
    help="Retrieval-augmented multimodal search for medical imaging archives.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for fn in (archive.ingest, archive.index, query.search, query.similar, query.case, archive.info, archive.check):
    app.command()(fn)
app.command("audit-phi")(archive.audit_phi)
app.command()(archive.remove)
app.command()(demo_cmd.demo)
app.command()(query.draft)
app.command()(evaluate.train)

eval_app = typer.Typer(help="Evaluate retrieval and report drafts on a dataset split.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
eval_app.command("retrieval")(evaluate.eval_retrieval)
eval_app.command("drafts")(evaluate.eval_drafts)

app.command()(server.serve)
app.command()(pacs.listen)

keys_app = typer.Typer(help="Create, list, rotate and revoke API keys (stored hashed in HOME/api_keys.json).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
keys_app.command("add")(server.keys_add)
keys_app.command("list")(server.keys_list)
keys_app.command("rotate")(server.keys_rotate)
keys_app.command("revoke")(server.keys_revoke)

app.command("backup")(admin.backup_cmd)
app.command("restore")(admin.restore_cmd)
audit_app = typer.Typer(help="The hash-chained audit log of the API (HOME/audit.log).", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
audit_app.command("verify")(admin.audit_verify)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
