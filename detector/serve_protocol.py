"""The service's HTTP/1.1 protocol: uvicorn's h11 protocol with a deadline for each request's head.

uvicorn times a connection out only between requests (keep-alive, after a response), and any byte resets that timer,
so a connection that never sends a request, or trickles its headers, holds a file descriptor for good: a station's
service with 1024 of them answered nobody until they closed (a slowloris). A request's body is the service's own
deadline's (serve.py); this bounds what comes before it. CloseUnreadContinue closes a connection whose request
waited for a 100 Continue that never came (answered before its body).
"""
from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S = 10.0   # from connecting (or the last response) to a request's complete head: a client sends it at once


class HeadDeadlineProtocol(H11Protocol):
    """Closes a connection whose next request's head has not fully arrived HEAD_TIMEOUT_S after it opened or after
    its last response; a request that has begun is never cut by it."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:   # a request's head is in (or the client closed): not ours now
            self._disarm()
        elif self._head_timer is None and not self.transport.is_closing():
            # a cycle began here: the body of a request answered before it was read (401, 413) has ended, after its
            # answer armed nothing and its bytes cancelled uvicorn's keep-alive timer
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()   # starts the next cycle, and any request already sent
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self, *_: Any) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class CloseUnreadContinue:
    """ASGI wrapper: an answer to an `Expect: 100-continue` request whose body the app never asked for (a 401, 413 or
    429 before the body) says `Connection: close`, so uvicorn closes the connection after it. uvicorn sends the 100
    only when the body is first read; without the header the client (rightly) sent no body, the service waited its
    keep-alive for one, and a client reusing the connection had its next request read as that body."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _expects_continue(scope):
            return await self.app(scope, receive, send)
        asked = False

        async def receive_body() -> dict:
            nonlocal asked
            asked = True   # uvicorn sends the 100 now: the client sends its body, which h11 reads to the end
            return await receive()

        async def send_answer(message: dict) -> None:
            headers = list(message.get("headers", []))
            if message["type"] == "http.response.start" and not asked and (b"connection", b"close") not in headers:
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_body, send_answer)


def _expects_continue(scope: dict) -> bool:
    """Whether the request's client waits for 100 Continue before sending its body."""
    return any(k == b"expect" and v.strip().lower() == b"100-continue" for k, v in scope.get("headers", []))
