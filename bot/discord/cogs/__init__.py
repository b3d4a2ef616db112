"""One cog per feature: a new slash command goes in the cog of its feature (or a new one,
added in `bot.discord.client.ImagineBot.setup_hook`), given the services it uses."""
