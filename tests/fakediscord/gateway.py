"""The fake's Gateway: HELLO, heartbeats, IDENTIFY → READY + GUILD_CREATE, dispatches, RESUME.

Plain JSON text frames: discord.py asks for ``compress=zlib-stream`` but only inflates binary
frames, so uncompressed text is fine. Every dispatch is kept per session, so a client that
reconnects (op 7, a dropped socket) and RESUMEs gets exactly what it missed.
"""

# Waits take a plain ``timeout=`` because that is the friendliest test API.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

if TYPE_CHECKING:
    from tests.fakediscord.server import FakeDiscord

HEARTBEAT_INTERVAL_MS = 41250

# Gateway intents the fake looks at.
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT


class Connection:
    """One WebSocket; a session outlives it when the client reconnects and resumes."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.session: GatewaySession | None = None
        # The close code of a server-initiated close is whatever the client echoes (aiohttp
        # answers 1000), so remember who started it.
        self.closed_by_server = False
        self._lock = asyncio.Lock()

    async def send(self, payload: dict[str, Any]) -> None:
        # Writers from several tasks (dispatches, heartbeat ACKs) must not interleave frames.
        async with self._lock:
            if not self.ws.closed:
                await self.ws.send_str(json.dumps(payload))

    async def close(self, code: int, reason: bytes = b"") -> None:
        self.closed_by_server = True
        await self.ws.close(code=code, message=reason)


@dataclass(eq=False)
class GatewaySession:
    id: str
    intents: int
    connection: Connection | None
    seq: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    resumes: int = 0
    invalidated: bool = False

    @property
    def connected(self) -> bool:
        return self.connection is not None and not self.connection.ws.closed


class Gateway:
    def __init__(self, fake: FakeDiscord) -> None:
        self._fake = fake
        self.sessions: list[GatewaySession] = []
        # Where dispatches go: the session that identified or resumed last.
        self.active: GatewaySession | None = None
        self._connections: list[Connection] = []
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return self.active is not None and self.active.connected

    def wants(self, intents: int) -> bool:
        return self.active is not None and bool(self.active.intents & intents)

    async def wait_ready(self, timeout: float) -> GatewaySession:
        def check() -> GatewaySession | None:
            return self.active if self.connected else None

        return await self._fake.changes.wait_until(
            check, timeout, lambda: "no bot on the gateway\n" + self._fake.describe_recent()
        )

    # -- dispatching ---------------------------------------------------------------------------
    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send an event to the active session; kept for RESUME if it is disconnected."""
        await self.flush()
        if self.active is not None:
            await self._send_event(self.active, event, data)

    def dispatch_soon(self, event: str, data: dict[str, Any]) -> None:
        """For world changes made from synchronous test code (a role added mid-test)."""
        if self.active is None:
            return
        task = asyncio.get_running_loop().create_task(self._send_event(self.active, event, data))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        # Changes made just before an interaction must reach the bot before it.
        if self._pending:
            await asyncio.gather(*self._pending)

    async def _send_event(self, session: GatewaySession, event: str, data: dict[str, Any]) -> None:
        session.seq += 1
        frame = {"op": 0, "t": event, "s": session.seq, "d": data}
        session.events.append(frame)
        if session.connected:
            assert session.connection is not None
            try:
                await session.connection.send(frame)
            except ConnectionError:
                pass  # the client resumes and gets it from session.events

    # -- test controls -------------------------------------------------------------------------
    async def request_reconnect(self) -> None:
        session = await self.wait_ready(10.0)
        assert session.connection is not None
        await session.connection.send({"op": 7, "d": None})

    async def drop(self, code: int) -> None:
        session = await self.wait_ready(10.0)
        assert session.connection is not None
        await session.connection.close(code)

    async def close_all(self) -> None:
        for connection in list(self._connections):
            await connection.close(1001, b"fake Discord is stopping")

    # -- the socket ----------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        connection = Connection(ws)
        self._connections.append(connection)
        try:
            if request.query.get("v") != "10" or request.query.get("encoding", "json") != "json":
                self._fake.errors.append(f"gateway opened with query {request.query_string!r}")
                await connection.close(4012, b"Invalid API version")
                return ws
            hello = {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}
            await connection.send({"op": 10, "d": hello, "s": None, "t": None})
            async for frame in ws:
                if frame.type is not WSMsgType.TEXT:
                    continue
                message = json.loads(frame.data)
                op, data = message.get("op"), message.get("d")
                if op == 1:
                    await connection.send({"op": 11, "d": None})
                elif op == 2:
                    await self._identify(connection, data)
                elif op == 6:
                    await self._resume(connection, data)
                elif op == 8:
                    await self._request_members(connection, data)
                # op 3 (presence) and 4 (voice) need no answer.
        finally:
            self._connections.remove(connection)
            session = connection.session
            if session is not None and session.connection is connection:
                session.connection = None
                # A client closing with 1000/1001 ends its session, as on Discord. (discord.py's
                # own close() races its reader and usually sends 4000, leaving it resumable.)
                if ws.close_code in (1000, 1001) and not connection.closed_by_server:
                    session.invalidated = True
                    if self.active is session:
                        self.active = None
            self._fake.changes.notify()
        return ws

    async def _identify(self, connection: Connection, data: dict[str, Any]) -> None:
        fake = self._fake
        if data.get("token") != fake.bot_token:
            await connection.close(4004, b"Authentication failed.")
            return
        intents = int(data.get("intents", 0))
        if intents & PRIVILEGED_INTENTS & ~fake.privileged_intents:
            await connection.close(4014, b"Disallowed intent(s).")
            return
        session = GatewaySession(id=uuid.uuid4().hex, intents=intents, connection=connection)
        connection.session = session
        self.sessions.append(session)
        self.active = session
        ready = {
            "v": 10,
            "user": {**fake.bot_user.payload(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [
                {"id": str(fake.guild_id if g is None else g.id), "unavailable": True}
                for g in fake.live_guilds()
            ],
            "session_id": session.id,
            # Without this a reconnect would go to the real gateway.
            "resume_gateway_url": fake.gateway_url,
            "shard": [0, 1],
            "application": {"id": str(fake.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
        }
        await self._send_event(session, "READY", ready)
        for guild in fake.live_guilds():
            await self._send_event(
                session, "GUILD_CREATE", fake.guild_payload(full=True, guild=guild)
            )
        fake.changes.notify()

    async def _resume(self, connection: Connection, data: dict[str, Any]) -> None:
        session_id = data.get("session_id")
        session = next((s for s in self.sessions if s.id == session_id and not s.invalidated), None)
        if session is None or data.get("token") != self._fake.bot_token:
            await connection.send({"op": 9, "d": False})
            return
        if session.connected and session.connection is not connection:
            assert session.connection is not None
            await session.connection.close(4000)
        session.connection = connection
        connection.session = session
        session.resumes += 1
        self.active = session
        last_seen = int(data.get("seq") or 0)
        for frame in [f for f in session.events if f["s"] > last_seen]:
            await connection.send(frame)
        await self._send_event(session, "RESUMED", {})
        self._fake.changes.notify()

    async def _request_members(self, connection: Connection, data: dict[str, Any]) -> None:
        # Only sent when the bot chunks (members intent); answer so its cache fills.
        if connection.session is None:
            return
        fake = self._fake
        chunk = {
            "guild_id": str(fake.guild_id),
            "members": [u.member_payload() for u in fake.users.values()],
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
            "nonce": data.get("nonce"),
        }
        await self._send_event(connection.session, "GUILD_MEMBERS_CHUNK", chunk)
