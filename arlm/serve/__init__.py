"""``arlm serve``: an OpenAI-compatible HTTP server on the engine.

config.py      ServeConfig, the server's settings
protocol.py    request bodies -> SamplingParams, checked field by field
responses.py   engine outputs -> OpenAI's response and stream shapes
errors.py      OpenAI's error body and statuses
metrics.py     Prometheus metrics under vLLM's names
app.py         the FastAPI routes on the engine's async front (Server, build_app)
server.py      the process: uvicorn, background loading, the drain on SIGTERM (serve)

Only the settings load with the package; the web stack loads with ``arlm.serve.app``.
"""

from arlm.serve.config import ServeConfig

__all__ = ["ServeConfig"]
