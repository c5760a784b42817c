"""CLI through typer's CliRunner: every command has help, the main path works, errors are clear."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out.extend([[name, sub] for sub in cmd.commands])
        out.append([name])
    return out


@pytest.mark.parametrize("cmd", _commands(), ids=lambda c: " ".join(c))
def test_every_command_has_help(cmd):
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and "--help" in r.output


def test_ingest_index_search_similar_end_to_end(tmp_path, covid_dir):
    home = str(tmp_path / "home")
    r = runner.invoke(app, ["ingest", str(covid_dir), "--home", home, "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["images_added"] == 50 and s["skipped"] == 0
    r = runner.invoke(app, ["ingest", str(covid_dir), "--home", home, "-q"])
    assert r.exit_code == 0 and "0 cases and 0 images added" in r.output
    r = runner.invoke(app, ["index", "--home", home, "--model", "towers", "--workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["indexes"]["image"]["count"] == 50
    r = runner.invoke(app, ["search", "pneumonia with bilateral opacities", "--home", home, "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)
    assert len(hits) == 3 and {"case_key", "image_key", "score", "modality_type", "diagnosis"} <= set(hits[0])
    img = sorted((covid_dir / "images").iterdir())[0]
    r = runner.invoke(app, ["similar", str(img), "--home", home, "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)[0]["image_key"] == img.stem
    r = runner.invoke(app, ["similar", str(img), "--home", home, "--modality", "CT"])
    assert r.exit_code == 0 and "X-ray" not in r.output.split("\n", 1)[1]
    r = runner.invoke(app, ["case", hits[0]["case_key"], "--home", home])
    assert r.exit_code == 0 and "IMAGES" in r.output
    r = runner.invoke(app, ["info", "--home", home, "--json"])
    assert json.loads(r.output)["images"] == 50
    r = runner.invoke(app, ["check", "--home", home])
    assert r.exit_code == 0 and "consistent" in r.output


def test_error_paths_are_one_clear_line(tmp_path):
    home = str(tmp_path / "empty")
    cases = [
        (["ingest", str(tmp_path / "missing"), "--home", home], "does not exist"),
        (["index", "--home", home], "no catalog"),
        (["search", "mass", "--home", home], "no catalog"),
        (["similar", "nothing.png", "--home", home], "no catalog"),
        (["case", "X", "--home", home], "no catalog"),
        (["info", "--home", home], "no catalog"),
        (["check", "--home", home], "no catalog"),
    ]
    from medsearch.catalog import Catalog

    made = tmp_path / "made"
    Catalog.open(made / "catalog.db").close()
    cases.append((["index", "--home", str(made), "--model", "hf-hub:nobody/nothing"], "nobody/nothing"))
    for args, expected in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert expected in r.output and "Traceback" not in r.output, (args, r.output)
