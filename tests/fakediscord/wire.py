"""HTTP plumbing of the fake: Discord-shaped errors, request records, faults, body parsing.

Kept apart from ``server.py`` so the handlers there read as Discord's behaviour, not as aiohttp.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.web_protocol import RequestPayloadError

from tests.fakediscord.interactions import FakeInteraction

API = "/api/v10"
MiB = 1024 * 1024

# Discord's message limits, as named constants so a changed limit is a one-line fix.
MAX_CONTENT = 2000
MAX_EMBEDS = 10
MAX_ATTACHMENTS = 10
MAX_ACTION_ROWS = 5
MAX_ROW_BUTTONS = 5
MAX_CUSTOM_ID = 100
MAX_BUTTON_LABEL = 80

_FILE_FIELD = re.compile(r"^files\[(\d+)\]$")

# What the middleware parses once per request, for the handlers.
JSON_KEY = web.RequestKey("json", object)
FILES_KEY = web.RequestKey("files", list)
INTERACTION_KEY = web.RequestKey("interaction", FakeInteraction)


# -- errors ----------------------------------------------------------------------------------


class FakeHTTPError(Exception):
    """An error answer in Discord's shape; handlers raise it, the middleware renders it."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        errors: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return body


def form_error(path: Iterable[str | int], code: str, message: str) -> FakeHTTPError:
    """400 Invalid Form Body with Discord's nested ``errors``, which discord.py flattens."""
    errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for key in reversed(list(path)):
        errors = {str(key): errors}
    return FakeHTTPError(400, 50035, "Invalid Form Body", errors)


def unknown(what: str, code: int) -> FakeHTTPError:
    return FakeHTTPError(404, code, f"Unknown {what}")


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    # Exactly "application/json": discord.py's json_or_text compares the header verbatim, and
    # web.json_response's "; charset=utf-8" makes it hand back a str (login then crashes).
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


# -- request records and faults ---------------------------------------------------------------


@dataclass
class UploadedFile:
    field: str
    index: int
    filename: str
    data: bytes
    content_type: str | None


@dataclass
class RecordedRequest:
    """One HTTP request the fake answered. ``path`` has no ``/api/v10`` prefix and no query."""

    method: str
    path: str
    query: dict[str, str]
    at: float
    route: str = ""
    json: Any = None
    files: list[UploadedFile] = field(default_factory=list)
    status: int | None = None
    code: int | None = None
    injected: bool = False
    # The client disconnected before the body arrived; no answer was sent.
    dropped: bool = False
    interaction: FakeInteraction | None = None

    def matches(self, method: str = "*", path: str = "*", status: int | None = None) -> bool:
        return (
            (method == "*" or self.method == method.upper())
            and fnmatch.fnmatchcase(self.path, path)
            and (status is None or self.status == status)
        )

    def __repr__(self) -> str:
        extra = f" code={self.code}" if self.code else ""
        files = f" files={[f.filename for f in self.files]}" if self.files else ""
        fault = " (injected)" if self.injected else ""
        return f"{self.method} {self.path} -> {self.status}{extra}{files}{fault}"


@dataclass
class Fault:
    """Answer the next ``times`` matching requests with ``status`` instead of handling them, or
    (``lose_answer``) handle them and close the connection before the answer."""

    method: str
    path: str
    status: int
    times: int
    retry_after: float
    is_global: bool = False
    with_files: bool | None = None
    # Handle the request (the message is made) and then drop the connection unanswered.
    lose_answer: bool = False
    hits: int = 0

    @property
    def exhausted(self) -> bool:
        return self.hits >= self.times

    def matches(self, record: RecordedRequest) -> bool:
        if self.exhausted or (self.method != "*" and record.method != self.method.upper()):
            return False
        if self.with_files is not None and bool(record.files) != self.with_files:
            return False
        return fnmatch.fnmatchcase(record.path, self.path)


def request_json(request: web.Request) -> dict[str, Any]:
    body = request[JSON_KEY]
    if body is None:
        return {}
    if not isinstance(body, dict | list):
        raise FakeHTTPError(400, 50109, "The request body contains invalid JSON.")
    return body  # type: ignore[return-value]


class ClientDisconnected(Exception):
    """The client went away before its request body arrived (a killed bot mid-upload): the
    request was dropped, which is the client's doing, not a fault of the fake."""


async def read_body(request: web.Request) -> tuple[Any, list[UploadedFile]]:
    """JSON body or multipart (``payload_json`` plus ``files[n]``) as discord.py sends them."""
    try:
        return await _read_body(request)
    except (ConnectionResetError, RequestPayloadError) as error:
        raise ClientDisconnected(str(error) or type(error).__name__) from error


async def _read_body(request: web.Request) -> tuple[Any, list[UploadedFile]]:
    files: list[UploadedFile] = []
    payload: Any = None
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            name = part.name or ""
            if name == "payload_json":
                payload = json.loads(await part.text())
                continue
            match = _FILE_FIELD.match(name)
            index = int(match.group(1)) if match else (0 if name == "file" else -1)
            data = bytes(await part.read(decode=False))
            content_type = part.headers.get("Content-Type")
            files.append(UploadedFile(name, index, part.filename or name, data, content_type))
    elif request.content_type == "application/x-www-form-urlencoded":
        # OAuth2's token endpoint takes a form (tests/fakediscord/oauth.py).
        payload = dict(await request.post())
    elif request.can_read_body:
        raw = await request.read()
        if raw:
            try:
                payload = json.loads(raw)
            except ValueError:
                raise FakeHTTPError(400, 50109, "The request body contains invalid JSON.") from None
    request[JSON_KEY] = payload
    request[FILES_KEY] = files
    return payload, files


def validate_components(rows: list[dict[str, Any]]) -> None:
    """Components v1 limits that discord.py leaves to Discord (custom_id length above all)."""
    if len(rows) > MAX_ACTION_ROWS:
        raise form_error(
            ["components"], "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_ACTION_ROWS} or fewer in length."
        )
    seen: set[str] = set()
    for r, row in enumerate(rows):
        if row.get("type") != 1:
            raise form_error(
                ["components", r, "type"],
                "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                "Top-level components must be action rows.",
            )
        children = row.get("components") or []
        if not children:
            raise form_error(
                ["components", r, "components"],
                "BASE_TYPE_MIN_LENGTH",
                "Must be 1 or more in length.",
            )
        buttons = [c for c in children if c.get("type") == 2]
        if len(buttons) != len(children) and len(children) != 1:
            raise form_error(
                ["components", r],
                "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                "A select menu needs its own row.",
            )
        if len(buttons) > MAX_ROW_BUTTONS:
            raise form_error(
                ["components", r, "components"],
                "BASE_TYPE_MAX_LENGTH",
                f"Must be {MAX_ROW_BUTTONS} or fewer in length.",
            )
        for c, component in enumerate(children):
            where = ["components", r, "components", c]
            custom_id = component.get("custom_id")
            is_link = component.get("type") == 2 and component.get("style") == 5
            if is_link:
                if not component.get("url") or custom_id:
                    raise form_error(
                        where,
                        "BUTTON_COMPONENT_INVALID",
                        "A link button needs a url and no custom_id.",
                    )
            elif not custom_id and component.get("style") != 6:
                raise form_error(
                    [*where, "custom_id"], "BASE_TYPE_REQUIRED", "This field is required"
                )
            if custom_id is not None:
                if not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
                    raise form_error(
                        [*where, "custom_id"],
                        "BASE_TYPE_BAD_LENGTH",
                        f"Must be between 1 and {MAX_CUSTOM_ID} in length.",
                    )
                if custom_id in seen:
                    raise form_error(
                        [*where, "custom_id"],
                        "COMPONENT_CUSTOM_ID_DUPLICATED",
                        "Component custom id cannot be duplicated",
                    )
                seen.add(custom_id)
            if len(component.get("label") or "") > MAX_BUTTON_LABEL:
                raise form_error(
                    [*where, "label"],
                    "BASE_TYPE_MAX_LENGTH",
                    f"Must be {MAX_BUTTON_LABEL} or fewer in length.",
                )
            if component.get("type") == 2 and not (
                component.get("label") or component.get("emoji")
            ):
                raise form_error(
                    where, "BUTTON_COMPONENT_INVALID", "A button needs a label or an emoji."
                )
