"""An OpenAI-compatible HTTP server on top of lmforge.infer, with continuous batching (docs/serve.md).

engine.py: the decode loop that batches every request's tokens; app.py: the routes and OpenAI's
request and response shapes; server.py: `lmforge serve` (load, listen, run uvicorn). Nothing in
lmforge imports this package but the CLI: it needs the `serve` extra (FastAPI, uvicorn).
"""
