"""`longva serve`: an OpenAI-compatible HTTP API (and an optional chat page) for LongVA.

`cli` is imported by `longva --help` and stays light; `app` needs the `serve` extra
(fastapi, uvicorn) and is imported only when a server starts.
"""
