"""Service commands: ``serve`` (the HTTP API and web page, TLS) and ``keys add|list|rotate|revoke``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli import output
from cli.options import Device, Home, JsonOut, Model, draft_options, handle_errors, home_dir

if TYPE_CHECKING:
    from medsearch.rag.config import DraftConfig

KeysFile = Annotated[Path | None, typer.Option(help="Keys file (default: HOME/api_keys.json).")]


@handle_errors
@draft_options
def serve(
    host: Annotated[str, typer.Option(help="Address to bind. Beyond loopback (e.g. 0.0.0.0) API keys are required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    home: Home = None,  # type: ignore[assignment]
    model: Model = None,
    device: Device = "auto",
    auth: Annotated[str, typer.Option(help="auto (keys required beyond loopback), required, off (loopback only).")] = "auto",
    keys_file: Annotated[Path | None, typer.Option(help="Hashed API keys file (default: HOME/api_keys.json).")] = None,
    rate_limit: Annotated[float, typer.Option(min=0, help="Requests per minute per key (or per address without a key); 0 = none.")] = 600,
    max_upload_mb: Annotated[float, typer.Option(min=0.01, help="Largest accepted upload in MiB.")] = 20,
    cors_origin: Annotated[list[str] | None, typer.Option("--cors-origin", help="Allow this browser origin (repeatable); CORS is off without it.")] = None,
    audit_log: Annotated[Path | None, typer.Option(help="Audit log file, JSON lines (default: HOME/audit.log; '-' = server log).")] = None,
    watch: Annotated[float, typer.Option(min=0, help="Seconds between checks for a new index generation; 0 = off.")] = 2.0,
    generator: Annotated[list[str] | None, typer.Option("--generator", "-g", help="Draft generator clients may use (repeatable): extractive (default), openai, llama-cpp, transformers.")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate chain (PEM): serve https.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="Private key (PEM) of --ssl-certfile.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow plain http beyond loopback (only behind a TLS proxy).")] = False,
    viewer_url: Annotated[str | None, typer.Option("--viewer-url", help="Hospital viewer URL template with {uid}, e.g. https://pacs/viewer?StudyInstanceUIDs={uid}; shown to admin keys for studies ingested with --link-back.")] = None,
    limit_concurrency: Annotated[int, typer.Option(min=0, help="Most open connections (and requests) at once; a request beyond it gets 503 at once; 0 = no limit.")] = 2048,
    backlog: Annotated[int, typer.Option(min=1, help="Connections the kernel queues before the server accepts them.")] = 2048,
    timeout_keep_alive: Annotated[int, typer.Option(min=1, help="Seconds an idle keep-alive connection stays open after a response.")] = 5,
    header_timeout: Annotated[float, typer.Option(min=0, help="Seconds a connection may take to send a request's headers before it is closed (slow clients); 0 = no limit.")] = 15,
    *,
    draft: DraftConfig,
) -> None:
    """Start the HTTP API and the web page (FastAPI on uvicorn). OpenAPI docs at /docs.

    Beyond loopback it needs TLS (--ssl-certfile/--ssl-keyfile) unless --insecure is given.
    LLM settings (--base-url, --gguf, ...) are the server's: clients only pick a generator from --generator.
    """
    import uvicorn

    from api.app import create_app
    from api.settings import ApiSettings

    if viewer_url is not None and "{uid}" not in viewer_url:
        from medsearch.errors import InvalidInput

        raise InvalidInput(f"--viewer-url {viewer_url!r} has no {{uid}}", hint="e.g. https://pacs/viewer?StudyInstanceUIDs={uid}")
    if auth not in ("auto", "required", "off"):
        raise typer.BadParameter("use auto, required or off", param_hint="--auth")
    settings = ApiSettings(
        home=home_dir(home), model=model, device=device, host=host, port=port, auth=auth, keys_file=keys_file,
        rate_per_minute=rate_limit, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        cors_origins=tuple(cors_origin or ()), audit_log=audit_log, watch_seconds=watch,
        draft_generators=tuple(generator or ("extractive",)), draft_fallback=draft.fallback, llm=draft.llm,
        viewer_url=viewer_url,
    )  # fmt: skip
    application = create_app(settings)  # checks the catalog and the keys before binding
    tls = _tls_options(host, ssl_certfile, ssl_keyfile, insecure)  # then TLS, still before binding
    keys = "required" if settings.auth_required else "optional (read access without a key)"
    output.line(f"medsearch on {'https' if tls else 'http'}://{host}:{port}  (web page /, docs /docs)  keys: {keys}")
    limits = _connection_limits(limit_concurrency, backlog, timeout_keep_alive, header_timeout)
    uvicorn.run(application, host=host, port=port, log_level=log_level, proxy_headers=False, server_header=False,
                **limits, **tls)  # fmt: skip


def _connection_limits(limit: int, backlog: int, keep_alive: int, header_timeout: float) -> dict:
    """uvicorn's connection settings. Raises the open-files limit so ``limit`` sockets fit in it
    (a server out of descriptors cannot even answer 503)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = (limit or backlog) + 256  # the sockets, plus the catalog, indexes, logs and libraries
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            output.warn(f"open files are limited to {new} (hard limit): fewer than --limit-concurrency {limit} "
                        "connections fit; raise `ulimit -Hn` or lower --limit-concurrency")  # fmt: skip
    out: dict = {"limit_concurrency": limit or None, "backlog": backlog, "timeout_keep_alive": keep_alive}
    if header_timeout > 0:
        from api.protocol import header_timeout_protocol

        out["http"] = header_timeout_protocol(header_timeout)
    return out


def _tls_options(host: str, certfile: Path | None, keyfile: Path | None, insecure: bool) -> dict[str, str]:
    """uvicorn's TLS arguments after checking the pair loads; plain http beyond loopback only with --insecure."""
    import ssl

    from api.settings import is_loopback
    from medsearch.errors import InvalidInput

    if (certfile is None) != (keyfile is None):
        raise InvalidInput("TLS needs both --ssl-certfile and --ssl-keyfile", hint="give both PEM files, or neither")
    if certfile is None or keyfile is None:
        if not is_loopback(host) and not insecure:
            raise InvalidInput(f"refusing to serve plain http on {host}, beyond loopback",
                               hint="give --ssl-certfile F --ssl-keyfile K, or --insecure behind a TLS-terminating proxy")  # fmt: skip
        return {}
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(certfile), str(keyfile))
    except (OSError, ssl.SSLError) as e:
        raise InvalidInput(f"cannot load the TLS certificate {certfile.name} with key {keyfile.name}: {e}",
                           hint="give a PEM certificate chain and its unencrypted PEM private key") from e  # fmt: skip
    return {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}


def _key_store(home: Path | None, keys_file: Path | None):
    from api.keys import KeyStore

    return KeyStore(keys_file or home_dir(home) / "api_keys.json")


@handle_errors
def keys_add(
    scope: Annotated[str, typer.Option(help="read (search, cases, images, drafts) or admin (also reindex).")] = "read",
    name: Annotated[str, typer.Option(help="A label for audit logs, e.g. the client's name.")] = "",
    home: Home = None,  # type: ignore[assignment]
    keys_file: KeysFile = None,
    json_out: JsonOut = False,
) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    info, key = _key_store(home, keys_file).add(scope=scope, name=name)
    if json_out:
        output.print_json({**info.public(), "key": key})
        return
    output.line(key)
    output.line(f"created {info.scope} key {info.id} ({info.name}); it is shown only now", err=True)


@handle_errors
def keys_list(home: Home = None, keys_file: KeysFile = None, json_out: JsonOut = False) -> None:  # type: ignore[assignment]
    """List keys (id, name, scope, created, revoked); never the keys themselves."""
    keys = _key_store(home, keys_file).keys()
    if json_out:
        output.print_json([k.public() for k in keys])
    else:
        output.print_keys(keys)


@handle_errors
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (8 hex characters, from `medsearch keys list`).")],
    home: Home = None,  # type: ignore[assignment]
    keys_file: KeysFile = None,
) -> None:
    """Revoke a key; a running server refuses it from its next request."""
    info = _key_store(home, keys_file).revoke(key_id)
    output.line(f"revoked {info.id} ({info.name})")


@handle_errors
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="The key's id (from `medsearch keys list`).")],
    overlap: Annotated[str, typer.Option(help="How long the old secret keeps working: 90s, 15m, 24h, 7d; 0 = not at all.")] = "24h",
    home: Home = None,  # type: ignore[assignment]
    keys_file: KeysFile = None,
    json_out: JsonOut = False,
) -> None:
    """Give a key a new secret (same id, name, scope) and print it once; the old one works for --overlap."""
    from api.keys import parse_duration

    info, key = _key_store(home, keys_file).rotate(key_id, overlap=parse_duration(overlap))
    if json_out:
        output.print_json({**info.public(), "key": key})
        return
    output.line(key)
    until = f"until {info.previous_expires_at}" if info.previous_expires_at else "no longer"
    output.line(f"rotated {info.id} ({info.name}); the old secret works {until}; the new one is shown only now", err=True)
