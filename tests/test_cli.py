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


def test_json_errors_have_the_api_shape_and_core_codes(tmp_path):
    """With --json an error is the API's body on stdout (same code vocabulary), still exit code 2."""
    from medsearch.errors import NotFound

    r = runner.invoke(app, ["search", "mass", "--home", str(tmp_path / "none"), "--json"])
    assert r.exit_code == 2
    err = json.loads(r.stdout)["error"]
    assert err["code"] == NotFound.code == "not_found" and "no catalog" in err["message"] and err["hint"]
    r = runner.invoke(app, ["search", "mass", "--home", str(tmp_path / "none")])
    assert r.exit_code == 2 and "error [not_found]: " in r.output and "hint: " in r.output


def test_every_error_class_has_its_own_code():
    from medsearch.errors import INTERNAL, MedsearchError, error_codes

    codes = error_codes()
    classes = []
    todo = [MedsearchError]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo.extend(cls.__subclasses__())
    assert len({c.code for c in classes}) == len(classes)  # no two classes share a code
    assert all(c.code in codes and codes[c.code][0] == c.http_status for c in classes)
    assert INTERNAL in codes and all(code.islower() and " " not in code for code in codes)


def test_progress_adapter_keeps_one_bar_per_stage(capsys):
    from cli.output import Progress

    with Progress() as p:
        for done in range(1, 51):
            p("embed", done, 50)
        p.stage("draft")(3, 10)
        tick = p.ticker("ingest")
        for _ in range(7):
            tick("item")
        bars = dict(p._bars)
        assert set(bars) == {"embed", "draft", "ingest"}  # one bar per stage, however many updates
        assert (bars["embed"].n, bars["embed"].total) == (50, 50)
        assert (bars["draft"].n, bars["ingest"].n) == (3, 7)
    assert not p._bars  # closed on exit
    with Progress(enabled=False) as off:
        off("embed", 1, 2)
        off.ticker("x")()
        assert not off._bars
    assert "embed" in capsys.readouterr().err  # bars go to stderr, never into --json stdout


def test_one_llm_option_block_for_draft_eval_drafts_and_serve():
    from cli.options import draft_config

    flags = ("--gguf", "--base-url", "--llm-model", "--api-key", "--model-dir", "--fallback", "--timeout",
             "--max-tokens", "--repeat-penalty")  # fmt: skip
    for cmd in (["draft"], ["eval", "drafts"], ["serve"]):
        out = runner.invoke(app, [*cmd, "--help"], terminal_width=200).output
        assert all(f in out for f in flags), (cmd, [f for f in flags if f not in out])
    cfg = draft_config(base_url="http://127.0.0.1:9/v1", llm_model="m", timeout=3.0, max_tokens=64,
                       repeat_penalty=1.3, fallback=True)  # fmt: skip
    assert cfg.fallback and cfg.generator == "extractive"
    assert (cfg.llm.base_url, cfg.llm.model, cfg.llm.timeout_s, cfg.llm.max_tokens, cfg.llm.repeat_penalty) == (
        "http://127.0.0.1:9/v1", "m", 3.0, 64, 1.3)


def test_llm_options_reach_the_drafter(tmp_path, covid_dir):
    """The block's values arrive as one DraftConfig: an unreachable openai endpoint with --fallback
    drafts with the extractive generator and says why (exit 0)."""
    home = str(tmp_path / "home")
    assert runner.invoke(app, ["ingest", str(covid_dir), "--home", home, "-q"]).exit_code == 0
    r = runner.invoke(app, ["index", "--home", home, "--model", "towers", "--workers", "0", "-q"])
    assert r.exit_code == 0, r.output
    img = sorted((covid_dir / "images").iterdir())[0]
    args = ["draft", str(img), "--home", home, "--generator", "openai", "--base-url", "http://127.0.0.1:9/v1",
            "--llm-model", "none", "--timeout", "0.5", "--json"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and json.loads(r.stdout)["error"]["code"] == "llm_unavailable", r.output
    r = runner.invoke(app, [*args, "--fallback"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["generator"] == "extractive" and d["fallback_from"] == "openai" and d["sentences"]
