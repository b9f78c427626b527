"""The gateway's route table: every OpenAI (and vLLM) path a client may call, next to the engine path it goes to.

Responsible for: the one list of proxied routes (client path, engine path, metric label, which body field
carries the prompt for prefix affinity, which Meter reads the answer's usage) and the sentence that names them in a 404.
Not responsible for: serving the routes (gateway.py), or the gateway's own routes (/v1/models, /healthz,
/metrics), which the gateway answers itself and which are named here only for the 404's sake.

Every proxied route shares one path through the gateway: the client's key, the key's limits, the usage
ledger, the wait for a replica, retries before the first byte and OpenAI-shaped errors. A route of the table
that a model's engine lacks (vLLM serves no embeddings for a generative model) answers an OpenAI-shaped 404
naming the routes that engine serves (gateway.py, with modelstatus.py's reading of the engine's schema).
"""

from __future__ import annotations

from dataclasses import dataclass

from slinfer.controller.messages import MessagesMeter
from slinfer.controller.responses_usage import ResponsesMeter
from slinfer.controller.usage import Meter


@dataclass(frozen=True)
class Route:
    """One proxied POST route."""

    path: str  # what the client calls on the gateway
    engine_path: str  # what the gateway calls on the engine (vLLM's OpenAI server)
    endpoint: str  # the `endpoint` label of the gateway's metrics
    prompt_field: str  # the body field whose first bytes decide prefix affinity ("" for none)
    meter: type[Meter] = Meter  # reads the answer's token counts for the usage ledger
    form: bool = False  # the body is multipart/form-data (its `model` a form field), passed on as it came


# The table: one glance shows what the gateway serves and where each request lands on the engine.
ROUTES: tuple[Route, ...] = (
    Route("/v1/chat/completions", "/v1/chat/completions", "chat", "messages"),
    Route("/v1/completions", "/v1/completions", "completions", "prompt"),
    Route("/v1/responses", "/v1/responses", "responses", "input", ResponsesMeter),
    Route("/v1/embeddings", "/v1/embeddings", "embeddings", "input"),
    Route("/tokenize", "/tokenize", "tokenize", ""),
    Route("/detokenize", "/detokenize", "detokenize", ""),
    # Anthropic's Messages API, as vLLM serves it (coding assistants call it): usage in its own fields.
    Route("/v1/messages", "/v1/messages", "messages", "messages", MessagesMeter),
    # The pooling routes, served by embedding, reranker and classifier models' engines only.
    Route("/v1/rerank", "/v1/rerank", "rerank", ""),
    Route("/v1/score", "/v1/score", "score", ""),
    Route("/pooling", "/pooling", "pooling", "input"),
    Route("/classify", "/classify", "classify", "input"),
    # Speech to text, on models whose engine serves it (a Whisper model): an audio file in a multipart form.
    Route("/v1/audio/transcriptions", "/v1/audio/transcriptions", "transcriptions", "", form=True),
)

BY_PATH: dict[str, Route] = {r.path: r for r in ROUTES}

# The gateway's own routes, answered without an engine.
OWN_ROUTES: tuple[str, ...] = ("GET /v1/models", "GET /v1/models/{id}", "GET /healthz", "GET /metrics")


def served() -> list[str]:
    """Every route the gateway answers, as "METHOD PATH"."""
    return [f"POST {r.path}" for r in ROUTES] + list(OWN_ROUTES)


def not_served_message(method: str, path: str) -> str:
    return f"No route {method} {path[:200]}; served: {', '.join(served())}"
