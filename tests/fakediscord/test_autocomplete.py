"""Autocomplete through the fake: the real discord.py client answers a type-4 interaction with a
type-8 result, and the fake holds both sides to what Discord accepts."""

from __future__ import annotations

from typing import Any

import discord
import pytest
from discord import app_commands

from tests.fakediscord import FakeDiscord, SchemaViolation

FRUITS = ["apple", "apricot", "banana", "cherry"]


def make_bot(guild_id: int, *, too_many: bool = False) -> discord.Client:
    client = discord.Client(intents=discord.Intents.default())
    tree = app_commands.CommandTree(client)
    seen: list[dict[str, Any]] = []
    client.seen = seen  # type: ignore[attr-defined]

    @tree.command(name="eat", description="Eat a fruit")
    @app_commands.describe(fruit="Which fruit", count="How many", note="Why")
    async def eat(
        interaction: discord.Interaction,
        fruit: str,
        count: app_commands.Range[int, 1, 5] = 1,
        note: str | None = None,
    ) -> None:
        await interaction.response.send_message(f"ate {count} {fruit}", ephemeral=True)

    @eat.autocomplete("fruit")
    async def fruit_names(
        interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        seen.append({"current": current, "count": interaction.namespace.count})
        names = [f"{n}{i}" for n in FRUITS for i in range(10)] if too_many else FRUITS
        return [app_commands.Choice(name=n, value=n) for n in names if n.startswith(current)]

    async def setup_hook() -> None:
        tree.copy_global_to(guild=discord.Object(guild_id))
        await tree.sync(guild=discord.Object(guild_id))

    client.setup_hook = setup_hook  # type: ignore[method-assign]
    return client


async def test_autocomplete_reaches_the_callback_and_returns_its_choices() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot(fake.guild_id)) as bot:
            option = fake.command("eat")["options"][0]
            assert option["name"] == "fruit" and option["autocomplete"] is True

            typing = await fake.autocomplete(alice, "eat", focused="fruit", fruit="ap", count=3)
            assert await typing.wait_acked() == 8
            assert typing.autocomplete_choices == [
                {"name": "apple", "value": "apple"},
                {"name": "apricot", "value": "apricot"},
            ]
            # The focused text came through as typed, with the options already filled in.
            assert bot.seen == [{"current": "ap", "count": 3}]  # type: ignore[attr-defined]

            with pytest.raises(SchemaViolation, match="not an autocomplete option"):
                await fake.autocomplete(alice, "eat", focused="note", note="x")
            with pytest.raises(SchemaViolation, match=r"outside 1\.\.5"):
                await fake.autocomplete(alice, "eat", focused="fruit", fruit="a", count=9)

            eaten = await fake.slash(alice, "eat", fruit="cherry")
            assert (await eaten.wait_original()).content == "ate 1 cherry"


async def test_more_than_25_choices_are_refused_like_discord_does() -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot(fake.guild_id, too_many=True)):
            typing = await fake.autocomplete(alice, "eat", focused="fruit", fruit="")
            assert await typing.wait_error(50035) == (400, 50035)
            assert typing.autocomplete_choices is None
