"""An OpenAI-compatible HTTP API over the swarm, and a chat page: ``brigade serve``.

``schemas`` holds the request bodies, ``text`` turns tokens into text deltas with stop strings,
``admission`` bounds how many requests run and wait, ``service`` turns a request into events
from the swarm, ``app`` maps it all onto HTTP (JSON and server-sent events), ``cli`` starts it.
"""
