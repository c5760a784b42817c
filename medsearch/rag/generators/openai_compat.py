"""Any OpenAI-compatible chat endpoint (llama.cpp server, vLLM, Ollama, a hosted API) via httpx.

POST {base_url}/chat/completions with the evidence prompt; ``stream`` uses server-sent
events and hands each text delta to ``on_token``. Connection errors, timeouts, 429 and 5xx
are retried ``retries`` times with exponential backoff, then raise ``LLMUnavailable``; a
reply without ``choices[0].message.content`` raises ``GenerationError`` (malformed).
"""

from __future__ import annotations

import json
import time
from typing import Any

from medsearch.errors import GenerationError, InvalidInput, LLMUnavailable, ModelNotAvailable
from medsearch.rag.config import LLMConfig
from medsearch.rag.evidence import EvidencePack
from medsearch.rag.generators.base import Generation, OnToken
from medsearch.rag.prompt import build_messages

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAICompatGenerator:
    """Chat completions over HTTP. ``base_url`` ends with the API root, e.g. ``http://127.0.0.1:8080/v1``."""

    name = "openai"

    def __init__(self, config: LLMConfig) -> None:
        if not config.base_url:
            raise InvalidInput(
                "the openai generator needs a base URL",
                hint="pass --base-url http://HOST:PORT/v1 or set MEDSEARCH_LLM_BASE_URL",
            )
        try:
            import httpx
        except ImportError as e:
            raise ModelNotAvailable("httpx is not installed", hint='pip install "medsearch[llm]"') from e
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            trust_env=False,  # never route a loopback model through a proxy from the environment
        )

    @property
    def model(self) -> str:
        return self.config.model or "default"

    def close(self) -> None:
        self._client.close()

    def generate(self, pack: EvidencePack, on_token: OnToken | None = None) -> Generation:
        """One chat completion for the evidence prompt (streamed when ``on_token`` is given)."""
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": build_messages(pack),
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
            "seed": self.config.seed,
        }
        stream = bool(on_token) and self.config.stream
        payload["stream"] = stream
        last: Exception | None = None
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(self.config.backoff_s * 2 ** (attempt - 1))
            try:
                text, meta = self._stream(payload, on_token) if stream else self._once(payload)
                return Generation(model=self.model, text=text, meta=meta)
            except _Retryable as e:
                last = e.cause
        raise LLMUnavailable(
            f"the LLM endpoint {self.url} did not answer after {self.config.retries + 1} attempts: {_describe(last)}",
            hint="check that the server runs and --base-url is right (it ends with /v1), raise the timeout, "
            "or add --fallback to draft with the extractive generator",
        )

    # ---------------------------------------------------------------- transport
    def _post(self, payload: dict[str, Any], stream: bool):
        import httpx

        try:
            if stream:
                req = self._client.build_request("POST", self.url, json=payload)
                return self._client.send(req, stream=True)
            return self._client.post(self.url, json=payload)
        except (httpx.TransportError, httpx.TimeoutException) as e:
            raise _Retryable(e) from e

    def _check_status(self, resp) -> None:
        if resp.status_code in _RETRY_STATUS:
            body = resp.read()[:300].decode("utf-8", "replace")
            resp.close()
            raise _Retryable(RuntimeError(f"HTTP {resp.status_code}: {body}"))
        if resp.status_code >= 400:
            body = resp.read()[:300].decode("utf-8", "replace")
            resp.close()
            raise LLMUnavailable(
                f"the LLM endpoint {self.url} refused the request: HTTP {resp.status_code} {body}",
                hint="check --llm-model and the API key (MEDSEARCH_LLM_API_KEY)",
            )

    def _once(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        resp = self._post(payload, stream=False)
        self._check_status(resp)
        try:
            data = resp.json()
        except ValueError:
            raise GenerationError(
                f"malformed completion from {self.url}: not JSON ({resp.text[:120]!r})",
                hint="point --base-url at an OpenAI-compatible /v1 API",
            ) from None
        text = _content(data)
        if text is None:
            raise GenerationError(
                f"malformed completion from {self.url}: no choices[0].message.content in {json.dumps(data)[:200]}",
                hint="point --base-url at an OpenAI-compatible /v1 API, or use --fallback",
            )
        choice = data["choices"][0]
        return text, {"finish_reason": choice.get("finish_reason"), "usage": data.get("usage")}

    def _stream(self, payload: dict[str, Any], on_token: OnToken | None) -> tuple[str, dict[str, Any]]:
        import httpx

        resp = self._post(payload, stream=True)
        self._check_status(resp)
        pieces: list[str] = []
        finish = None
        deadline = time.monotonic() + self.config.timeout_s
        try:
            for line in resp.iter_lines():
                if time.monotonic() > deadline:
                    raise _Retryable(TimeoutError(f"stream exceeded {self.config.timeout_s:.0f}s"))
                line = line.strip()
                if not line or line.startswith(":") or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                    choice = chunk["choices"][0] if chunk.get("choices") else {}
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise GenerationError(
                        f"malformed stream chunk from {self.url}: {data[:120]!r}",
                        hint="the server is not OpenAI-compatible; try without streaming or use --fallback",
                    ) from None
                delta = (choice.get("delta") or {}).get("content")
                if isinstance(delta, str) and delta:
                    pieces.append(delta)
                    if on_token:
                        on_token(delta)
                finish = choice.get("finish_reason") or finish
        except (httpx.TransportError, httpx.TimeoutException) as e:
            raise _Retryable(e) from e
        finally:
            resp.close()
        if not pieces:
            raise GenerationError(f"empty completion stream from {self.url}", hint="use --fallback, or check the model")
        return "".join(pieces), {"finish_reason": finish}


class _Retryable(Exception):
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _describe(e: Exception | None) -> str:
    if e is None:
        return "no answer"
    name = type(e).__name__
    return f"{name}: {e}" if str(e) else name


def _content(data: Any) -> str | None:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) and content.strip() else None
