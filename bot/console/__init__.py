"""The console front end: the bot's commands in a terminal (`python -m bot --shell`)."""
