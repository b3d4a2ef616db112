"""The application, whatever the front end: what members and admins can do (`application.py`),
who may do it (`access.py`), members' pictures fetched and checked (`fetch.py`, `inputs.py`),
moderation, the text both front ends show (`render.py`), the catalog of models, the health
endpoints and the log setup. Nothing here imports discord."""
