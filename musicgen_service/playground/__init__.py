"""The playground (``script/playground``): a web page that is a client of the Cog HTTP API.

It drives any server of this project (``script/serve``, the Docker image, the streaming, loop and
training servers) through the API a deployment exposes, and imports nothing of the model: the Python
side is the standard library only. ``app`` serves the page and relays the API (the browser cannot
call a Cog server of another origin: Cog sends no CORS headers); ``jobs`` receives each prediction's
webhooks and keeps the history; ``servers`` knows the servers it talks to and starts local ones on a
weights folder when it is given none.
"""
