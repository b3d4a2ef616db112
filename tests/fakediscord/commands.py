"""Application-command schemas: checking what the bot syncs, and building invocations against it.

discord.py enforces none of the option constraints (choices, ranges, lengths, required options,
``default_member_permissions``); Discord's client and server do. So the fake checks every test
invocation against the schema the bot actually synced, and raises in the test when a real user
could not have sent it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tests.fakediscord.model import ADMINISTRATOR, Channel, Role, Upload, User

# Option types (Discord's ApplicationCommandOptionType).
SUB_COMMAND = 1
SUB_COMMAND_GROUP = 2
STRING = 3
INTEGER = 4
BOOLEAN = 5
USER = 6
CHANNEL = 7
ROLE = 8
MENTIONABLE = 9
NUMBER = 10
ATTACHMENT = 11

TYPE_NAMES = {
    SUB_COMMAND: "subcommand",
    SUB_COMMAND_GROUP: "subcommand group",
    STRING: "string",
    INTEGER: "integer",
    BOOLEAN: "boolean",
    USER: "user",
    CHANNEL: "channel",
    ROLE: "role",
    MENTIONABLE: "mentionable",
    NUMBER: "number",
    ATTACHMENT: "attachment",
}

# Discord's documented limits for command definitions.
MAX_NAME = 32
MAX_DESCRIPTION = 100
MAX_OPTIONS = 25
MAX_CHOICES = 25
MAX_STRING_OPTION = 6000
MAX_SAFE_INTEGER = 2**53
_NAME_RE = re.compile(r"^[-_\w]{1,32}$")


class SchemaViolation(AssertionError):
    """A test tried an invocation that Discord's client would never send."""


class CommandNotPermitted(SchemaViolation):
    """The member lacks the command's ``default_member_permissions``, so Discord hides it."""


# -- checking what the bot syncs -------------------------------------------------------------


def sync_errors(commands: Any) -> dict[str, Any]:
    """Errors in Discord's nested ``errors`` shape for a bulk-overwrite body; empty when valid."""
    errors: dict[str, Any] = {}
    if not isinstance(commands, list):
        return {"_errors": [_err("BASE_TYPE_ARRAY", "Must be an array.")]}
    names: set[tuple[int, str]] = set()
    for index, command in enumerate(commands):
        problems = _command_problems(command)
        key = (command.get("type", 1), command.get("name"))
        if key in names:
            problems["name"] = _errs("APPLICATION_COMMANDS_DUPLICATE_NAME", "Duplicate name.")
        names.add(key)
        if problems:
            errors[str(index)] = problems
    return errors


def _err(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _errs(code: str, message: str) -> dict[str, Any]:
    return {"_errors": [_err(code, message)]}


def _command_problems(command: dict[str, Any]) -> dict[str, Any]:
    problems: dict[str, Any] = {}
    name = command.get("name", "")
    command_type = command.get("type", 1)
    if command_type == 1 and (not _NAME_RE.match(name) or name != name.lower()):
        problems["name"] = _errs("APPLICATION_COMMAND_INVALID_NAME", f"Invalid name {name!r}.")
    description = command.get("description", "")
    if command_type == 1 and not 1 <= len(description) <= MAX_DESCRIPTION:
        problems["description"] = _errs(
            "BASE_TYPE_BAD_LENGTH", f"Must be between 1 and {MAX_DESCRIPTION} in length."
        )
    options = command.get("options") or []
    option_problems = _options_problems(options)
    if option_problems:
        problems["options"] = option_problems
    return problems


def _options_problems(options: list[dict[str, Any]]) -> dict[str, Any]:
    problems: dict[str, Any] = {}
    if len(options) > MAX_OPTIONS:
        return _errs("BASE_TYPE_MAX_LENGTH", f"Must be {MAX_OPTIONS} or fewer in length.")
    seen_optional = False
    names: set[str] = set()
    for index, option in enumerate(options):
        mine: dict[str, Any] = {}
        name = option.get("name", "")
        if not _NAME_RE.match(name) or name != name.lower():
            mine["name"] = _errs("APPLICATION_COMMAND_INVALID_NAME", f"Invalid name {name!r}.")
        if name in names:
            mine["name"] = _errs("APPLICATION_COMMAND_OPTIONS_NAME_ALREADY_EXISTS", "Duplicate.")
        names.add(name)
        if not 1 <= len(option.get("description", "")) <= MAX_DESCRIPTION:
            mine["description"] = _errs(
                "BASE_TYPE_BAD_LENGTH", f"Must be between 1 and {MAX_DESCRIPTION} in length."
            )
        if option.get("required"):
            if seen_optional:
                mine["required"] = _errs(
                    "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                    "Required options must be placed before non-required options.",
                )
        elif option.get("type") not in (SUB_COMMAND, SUB_COMMAND_GROUP):
            seen_optional = True
        if len(option.get("choices") or []) > MAX_CHOICES:
            mine["choices"] = _errs("BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CHOICES} or fewer.")
        if option.get("autocomplete") and option.get("choices"):
            mine["autocomplete"] = _errs(
                "APPLICATION_COMMAND_AUTOCOMPLETE_CHOICES",
                "Autocomplete cannot be set on an option with choices.",
            )
        nested = _options_problems(option.get("options") or [])
        if nested:
            mine["options"] = nested
        if mine:
            problems[str(index)] = mine
    return problems


# -- building invocations --------------------------------------------------------------------


@dataclass
class Invocation:
    """The ``data`` of an INTERACTION_CREATE for a slash command, and the uploads it carries."""

    data: dict[str, Any]
    uploads: list[tuple[str, Upload]]  # (attachment id, upload)


def find_command(
    commands: Mapping[str, dict[str, Any]], path: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Walk ``/admin credits grant`` down to its leaf; returns (command, option chain, leaf)."""
    top = commands.get(path[0])
    if top is None or top.get("type", 1) != 1:
        synced = ", ".join(sorted(f"/{n}" for n, c in commands.items() if c.get("type", 1) == 1))
        raise SchemaViolation(f"/{path[0]} is not a synced slash command (synced: {synced or '-'})")
    chain: list[dict[str, Any]] = []
    node = top
    for part in path[1:]:
        subs = {
            o["name"]: o
            for o in node.get("options") or []
            if o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP)
        }
        if part not in subs:
            raise SchemaViolation(
                f"/{' '.join(path)}: {part!r} is not a subcommand here (choices: {sorted(subs)})"
            )
        node = subs[part]
        chain.append(node)
    remaining = [
        o["name"]
        for o in node.get("options") or []
        if o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP)
    ]
    if remaining:
        raise SchemaViolation(f"/{' '.join(path)} needs a subcommand: one of {sorted(remaining)}")
    return top, chain, node


def check_permissions(command: dict[str, Any], member_permissions: int, path: str) -> None:
    required = command.get("default_member_permissions")
    if required is None or member_permissions & ADMINISTRATOR:
        return
    required_bits = int(required)
    if required_bits == 0 or member_permissions & required_bits != required_bits:
        raise CommandNotPermitted(
            f"/{path} needs permissions {required_bits} (default_member_permissions); the member "
            f"has {member_permissions}, so Discord would not offer the command"
        )


@dataclass
class Resolver:
    """How the fake turns test objects into resolved payloads for ``data.resolved``."""

    # A user's permissions in the interaction's guild; None when they are not a member of it
    # (then Discord resolves only the user, and discord.py gives a User, not a Member).
    member_permissions: Callable[[User], int | None]
    channel_permissions: Callable[[Channel], int]
    new_attachment_id: Callable[[], int]


def build_invocation(
    command: dict[str, Any],
    chain: list[dict[str, Any]],
    leaf: dict[str, Any],
    values: Mapping[str, Any],
    path: str,
    resolver: Resolver,
) -> Invocation:
    schema = {o["name"]: o for o in leaf.get("options") or []}
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise SchemaViolation(f"/{path}: unknown option(s) {unknown}; known: {sorted(schema)}")
    missing = [n for n, o in schema.items() if o.get("required") and n not in values]
    if missing:
        raise SchemaViolation(f"/{path}: required option(s) missing: {missing}")

    resolved: dict[str, dict[str, Any]] = {}
    uploads: list[tuple[str, Upload]] = []
    options: list[dict[str, Any]] = []
    # Discord sends options in the order the schema declares them.
    for name, option in schema.items():
        if name not in values:
            continue
        value = values[name]
        if value is None:
            continue
        wire = _option_value(option, value, f"/{path} {name}", resolved, uploads, resolver)
        options.append({"name": name, "type": option["type"], "value": wire})

    # Nest the leaf's options inside its subcommand (and group), innermost first.
    for node in reversed(chain):
        options = [{"name": node["name"], "type": node["type"], "options": options}]

    data: dict[str, Any] = {
        "id": command["id"],
        "name": command["name"],
        "type": 1,
        "options": options,
    }
    if command.get("guild_id") is not None:
        data["guild_id"] = command["guild_id"]
    if resolved:
        data["resolved"] = resolved
    return Invocation(data=data, uploads=uploads)


def build_autocomplete(
    command: dict[str, Any],
    chain: list[dict[str, Any]],
    leaf: dict[str, Any],
    values: Mapping[str, Any],
    focused: str,
    path: str,
    resolver: Resolver,
) -> Invocation:
    """The ``data`` of an autocomplete interaction (type 4) while the member types ``focused``.

    Discord's client asks only for an option declared with ``autocomplete`` and sends what is
    typed so far as a raw string, whatever the option's type; the options already filled in
    are sent as they are (and checked like a real invocation's).
    """
    schema = {o["name"]: o for o in leaf.get("options") or []}
    option = schema.get(focused)
    if option is None or not option.get("autocomplete"):
        declared = sorted(n for n, o in schema.items() if o.get("autocomplete"))
        raise SchemaViolation(
            f"/{path} {focused}: not an autocomplete option (those are: {declared or '-'})"
        )
    typed = values.get(focused, "")
    if not isinstance(typed, str):
        raise SchemaViolation(f"/{path} {focused}: the typed text is a string, got {typed!r}")
    rest = {name: value for name, value in values.items() if name != focused}
    # Required options may still be empty while another one is being typed.
    relaxed = {**leaf, "options": [{**o, "required": False} for o in schema.values()]}
    invocation = build_invocation(command, chain, relaxed, rest, path, resolver)
    options = invocation.data["options"]
    for _node in chain:  # down to the leaf's own option list
        options = options[0]["options"]
    entry = {"name": focused, "type": option["type"], "value": typed, "focused": True}
    order = list(schema)
    options.append(entry)
    options.sort(key=lambda o: order.index(o["name"]))
    return invocation


def autocomplete_errors(option: dict[str, Any], choices: Any) -> str | None:
    """What Discord would refuse in an autocomplete answer for ``option``; None when valid."""
    if not isinstance(choices, list) or len(choices) > MAX_CHOICES:
        return f"choices: must be a list of at most {MAX_CHOICES}"
    numeric = (int, float) if option["type"] == NUMBER else (int,)
    for choice in choices:
        name, value = choice.get("name"), choice.get("value")
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_DESCRIPTION:
            return f"choice name {name!r}: must be 1..{MAX_DESCRIPTION} characters"
        if option["type"] == STRING:
            if not isinstance(value, str) or len(value) > MAX_DESCRIPTION:
                return f"choice value {value!r}: must be a string of at most 100 characters"
        elif isinstance(value, bool) or not isinstance(value, numeric):
            return f"choice value {value!r}: must be a {TYPE_NAMES[option['type']]}"
    return None


def _option_value(
    option: dict[str, Any],
    value: Any,
    where: str,
    resolved: dict[str, dict[str, Any]],
    uploads: list[tuple[str, Upload]],
    resolver: Resolver,
) -> Any:
    kind = option["type"]
    expected = TYPE_NAMES.get(kind, str(kind))

    def bad(reason: str) -> SchemaViolation:
        return SchemaViolation(f"{where}: {reason} (option type {expected})")

    if kind == STRING:
        if not isinstance(value, str):
            raise bad(f"{value!r} is not a string")
        low = option.get("min_length", 0)
        high = option.get("max_length", MAX_STRING_OPTION)
        if not low <= len(value) <= high:
            raise bad(f"length {len(value)} is outside {low}..{high}")
        _check_choice(option, value, bad)
        return value
    if kind in (INTEGER, NUMBER):
        numeric = (int,) if kind == INTEGER else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise bad(f"{value!r} is not a{'n integer' if kind == INTEGER else ' number'}")
        low = option.get("min_value", -MAX_SAFE_INTEGER)
        high = option.get("max_value", MAX_SAFE_INTEGER)
        if not low <= value <= high:
            raise bad(f"{value} is outside {low}..{high}")
        _check_choice(option, value, bad)
        return value
    if kind == BOOLEAN:
        if not isinstance(value, bool):
            raise bad(f"{value!r} is not a boolean")
        return value
    if kind == USER or (kind == MENTIONABLE and isinstance(value, User)):
        if not isinstance(value, User):
            raise bad(f"{value!r} is not a user (use fake.add_user)")
        resolved.setdefault("users", {})[str(value.id)] = value.payload()
        permissions = resolver.member_permissions(value)
        if permissions is not None:
            member = value.member_payload(permissions, with_user=False)
            resolved.setdefault("members", {})[str(value.id)] = member
        return str(value.id)
    if kind == ROLE or (kind == MENTIONABLE and isinstance(value, Role)):
        if not isinstance(value, Role):
            raise bad(f"{value!r} is not a role (use fake.add_role)")
        resolved.setdefault("roles", {})[str(value.id)] = value.payload()
        return str(value.id)
    if kind == MENTIONABLE:
        raise bad(f"{value!r} is neither a user nor a role")
    if kind == CHANNEL:
        if not isinstance(value, Channel):
            raise bad(f"{value!r} is not a channel")
        allowed = option.get("channel_types")
        if allowed and value.type not in allowed:
            raise bad(f"channel type {value.type} is not one of {allowed}")
        payload = value.payload()
        payload["permissions"] = str(resolver.channel_permissions(value))
        resolved.setdefault("channels", {})[str(value.id)] = payload
        return str(value.id)
    if kind == ATTACHMENT:
        if isinstance(value, tuple) and len(value) == 2:
            value = Upload(value[0], value[1])
        if not isinstance(value, Upload):
            raise bad(f"{value!r} is not an Upload (or a (filename, bytes) tuple)")
        attachment_id = str(resolver.new_attachment_id())
        uploads.append((attachment_id, value))
        return attachment_id
    raise bad(f"option type {kind} is not supported by the fake")


def _check_choice(option: dict[str, Any], value: Any, bad: Callable[[str], Exception]) -> None:
    choices = option.get("choices")
    if choices and value not in [c["value"] for c in choices]:
        raise bad(f"{value!r} is not one of the choices {[c['value'] for c in choices]}")
