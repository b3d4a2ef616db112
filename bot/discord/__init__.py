"""The Discord front end (discord.py): the client (`client.py`), one cog per feature
(`cogs/`), what members press (`views/`: buttons, forms, the settings panel), the one message
per job that delivery edits into the result, and the door every interaction comes through
(`gate.py`). It calls the app and renders; rules live in `bot.app`."""
