"""uvicorn's h11 protocol with a request-header timeout: the slow-client (slowloris) guard.

uvicorn closes a keep-alive connection that stays idle after a response (``--timeout-keep-alive``),
but it has no timeout for a connection that opens and then sends its request headers slowly, or
never: the keep-alive timer is not armed before the first request and any byte cancels it. Such a
socket costs no thread, but it counts towards ``--limit-concurrency`` for as long as the client
likes, so that many trickling sockets make every other request a 503, for good.

``header_timeout_protocol(seconds)`` returns an ``H11Protocol`` subclass that closes a connection
whose next request's headers have not arrived ``seconds`` after it opened (or after its previous
response completed). A request whose headers arrived is never cut, however long its body upload
or its handler takes. Imported only by ``medsearch serve``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """An ``H11Protocol`` that closes connections slower than ``seconds`` to send request headers."""
    if seconds <= 0:
        raise ValueError(f"the header timeout must be positive, got {seconds}")

    class HeaderTimeoutH11(H11Protocol):
        header_timeout = seconds
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request: _arm sees its cycle
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            if self.transport is None or self.transport.is_closing():
                return
            armed = self.cycle  # a new request replaces self.cycle as soon as its headers are parsed
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_fired, armed)

        def _header_timeout_fired(self, armed: Any) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            waiting = self.cycle is armed and (self.cycle is None or self.cycle.response_complete)
            if waiting:  # no request head since the timer was armed: a slow or silent client
                self.transport.close()

    return HeaderTimeoutH11
