"""The OpenAI-compatible HTTP API over the swarm (`homeswarm serve`).

``schemas`` validates requests, ``engine`` runs generations in worker threads, ``text`` turns tokens
into streamed text with stop strings, ``app`` maps it all onto OpenAI's endpoints, ``server`` runs it
under uvicorn.
"""
