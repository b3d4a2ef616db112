"""imagine-bot, in layers that import only downward: `discord/` and `console/` (front ends) ->
`app/` (what members can do, front-end neutral) -> `core/` (jobs, credits, scheduling, workers;
no discord) -> `config/` (config.toml as one typed object); beside them, `generation/` (the
image engine) imports nothing of `bot`."""
