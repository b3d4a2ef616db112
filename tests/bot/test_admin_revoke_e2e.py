"""`/admin credits revoke` through the fake Discord: an owner takes granted credits back (a
`revoke` ledger row with the owner and the reason, the same the web dashboard writes), never
more than were granted, and a server admin can't."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.bot.helpers import assert_ledger_consistent, make_bot, private_answer
from tests.fakediscord import MANAGE_GUILD, FakeDiscord


async def test_an_owner_takes_granted_credits_back_and_a_server_admin_cannot(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        moderator = fake.add_user("moderator", permissions=MANAGE_GUILD)
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            grant = await fake.slash(fake.owner, "admin credits grant", user=alice, amount=10)
            assert "Granted 10" in await private_answer(grant)
            revoke = await fake.slash(
                fake.owner, "admin credits revoke", user=alice, amount=4, reason="double prize"
            )
            assert "granted balance now 6" in await private_answer(revoke)
            too_many = await fake.slash(fake.owner, "admin credits revoke", user=alice, amount=7)
            assert "has 6 granted credits, fewer than 7" in await private_answer(too_many)
            refused = await fake.slash(moderator, "admin credits revoke", user=alice, amount=1)
            assert "only the bot's owners" in await private_answer(refused)

            rows = await bot.core.db.read(
                "SELECT kind, granted_delta, actor_id, reason FROM ledger "
                "WHERE user_id = ? AND kind = 'revoke'",
                (alice.id,),
            )
            assert [tuple(r) for r in rows] == [("revoke", -4, fake.owner.id, "double prize")]
            assert (await bot.core.credits.balance(alice.id)).granted == 6
            await assert_ledger_consistent(bot)
