"""Requests cut short by the client: the fake records a dropped request, it does not crash."""

from __future__ import annotations

import asyncio

from tests.fakediscord import FakeDiscord


async def _send_truncated_upload(fake: FakeDiscord, path: str) -> None:
    """Send a multipart upload's headers and half its body, then vanish, as a SIGKILLed bot
    does mid-upload."""
    boundary = "cut-short"
    body_start = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="payload_json"\r\n'
            "Content-Type: application/json\r\n\r\n"
            '{"content": "grid"}\r\n'
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="files[0]"; filename="grid.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + b"\x89PNG"
        + b"\0" * 4000
    )
    head = (
        f"POST /api/v10{path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{fake.port}\r\n"
        f"Authorization: Bot {fake.bot_token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body_start) * 4}\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    writer.write(head + body_start)
    await writer.drain()
    writer.transport.abort()


async def test_a_client_that_disconnects_mid_upload_is_a_dropped_request() -> None:
    async with FakeDiscord() as fake:
        path = f"/channels/{fake.general.id}/messages"
        await _send_truncated_upload(fake, path)
        await fake.wait_for(lambda: any(r.dropped for r in fake.requests))
        dropped = [r for r in fake.requests if r.dropped]
        assert [(r.method, r.path) for r in dropped] == [("POST", path)]
        assert dropped[0].status is None
        assert fake.errors == []
        # Nothing was half-posted.
        assert not [m for m in fake.messages if m.channel_id == fake.general.id]
