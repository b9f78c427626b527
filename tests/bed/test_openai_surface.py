"""The OpenAI surface beyond chat, on the real bed: model status through a scale from zero (and `slinfer models`),
the Responses API plain and streamed with its usage in the ledger, /tokenize and /detokenize, streamed
completions, request features passed through (n, logprobs, stop, seed; the engine's own error where it
refuses one), the 404 of an unserved route, and structured output on the real smollm2 model. Every call goes
through the official `openai` client (or plain HTTP where the route is vLLM's own) to the controller's gateway,
in front of real vLLM engines started by the controller's own Slurm jobs."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from slinfer.dev import devcluster
from tests.bed.test_controller import _client, _replicas
from tests.fakes.slurmbed import SlurmBed, wait_until

pytestmark = pytest.mark.bed
MODEL = "tiny"
REAL_MODEL = "smollm2"
# The tiny model's engine runs with --max-model-len 512 (devcluster's catalog).
TINY_MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def bed(slurm_bed: SlurmBed) -> Iterator[SlurmBed]:
    slurm_bed.cleanup_jobs()
    wait_until("no controller job left by an earlier module", lambda: not slurm_bed.controller_jobs(), 180)
    yield slurm_bed
    slurm_bed.retire_models(MODEL, REAL_MODEL)


def _http(bed: SlurmBed, method: str, path: str, body: dict[str, Any] | None = None,
          key: str | None = None) -> tuple[int, dict[str, Any]]:
    """(status, JSON) of one call to the gateway; `path` is below the gateway's root."""
    env = bed.bed.env()
    root = env["SLINFER_GATEWAY_URL"].removesuffix("/v1")
    request = urllib.request.Request(f"{root}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {key or env['SLINFER_API_KEY']}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _status(bed: SlurmBed, model: str) -> dict[str, Any]:
    status, body = _http(bed, "GET", "/v1/models")
    assert status == 200, body
    return next(m for m in body["data"] if m["id"] == model)


def _cli_models(bed: SlurmBed) -> dict[str, list[str]]:
    """`slinfer models` as a user runs it (client key from the environment, no admin config): model -> cells."""
    env = {k: v for k, v in bed.env().items() if k not in ("SLINFER_CONFIG", "SLINFER_CONTROLLER")}
    out = subprocess.run([str(Path(devcluster._bin_dir()) / "slinfer"), "models"], env=env, capture_output=True,
                         text=True, check=True, timeout=30).stdout
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["MODEL", "STATE", "REPLICAS", "MAX_LEN"], out
    return {line.split()[0]: line.split() for line in lines[1:]}


def test_models_show_offline_then_starting_or_queued_then_ready_and_slinfer_models_prints_the_same(
        bed: SlurmBed) -> None:
    tiny = _status(bed, MODEL)
    assert tiny["slinfer"]["state"] == "offline", tiny
    assert tiny["slinfer"]["min_replicas"] == 0
    assert _status(bed, REAL_MODEL)["slinfer"]["state"] == "offline"
    assert _cli_models(bed)[MODEL][1] == "offline"

    answer: list[str] = []
    thread = threading.Thread(target=lambda: answer.append(_client(bed).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4).choices[0].message.content or ""))
    thread.start()
    seen: list[dict[str, Any]] = []
    cli_while_scaling: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = _status(bed, MODEL)["slinfer"]
        if not seen or seen[-1]["state"] != state["state"]:
            seen.append(state)
            print(f"\n/v1/models {MODEL}: {state}")
            if state["state"] in ("queued", "starting") and not cli_while_scaling:
                cli_while_scaling = _cli_models(bed)[MODEL]
        if state["state"] == "ready":
            break
        time.sleep(0.3)
    thread.join(timeout=300)
    states = [s["state"] for s in seen]
    assert states[-1] == "ready", states
    middle = [s for s in seen[:-1] if s["state"] in ("queued", "starting")]
    assert middle, f"no queued or starting state was seen before ready: {states}"
    for s in middle:
        if s["state"] == "starting":
            assert 0 <= s["starting_s"] < 300
        else:
            assert s["reason"] and s["queued_s"] >= 0
    assert cli_while_scaling and cli_while_scaling[1] in ("queued", "starting"), cli_while_scaling
    assert answer, "the request that woke the model failed"

    tiny = _status(bed, MODEL)
    assert tiny["slinfer"] == {"state": "ready", "replicas": 1, "min_replicas": 0, "max_replicas": 2}
    assert tiny["max_model_len"] == TINY_MAX_MODEL_LEN
    row = _cli_models(bed)[MODEL]
    assert row[1:4] == ["ready", "1", str(TINY_MAX_MODEL_LEN)], row


def test_responses_plain_and_streamed_and_the_ledger_counts_their_tokens(bed: SlurmBed) -> None:
    created = bed.run("slinfer", "keys", "create", "responses-test").stdout
    key_id = re.search(r"key id: (\S+)", created).group(1)  # type: ignore[union-attr]
    secret = re.search(r"secret: (\S+)", created).group(1)  # type: ignore[union-attr]
    client = openai.OpenAI(base_url=bed.bed.env()["SLINFER_GATEWAY_URL"], api_key=secret, timeout=300,
                           max_retries=0)

    plain = client.responses.create(model=MODEL, input="Tell me about Slurm.", max_output_tokens=16,
                                    temperature=0.0)
    assert plain.object == "response" and plain.status in ("completed", "incomplete")
    assert plain.output_text
    assert plain.usage is not None and plain.usage.input_tokens > 0 and plain.usage.output_tokens > 0

    events = list(client.responses.create(model=MODEL, input="Tell me about GPUs.", max_output_tokens=16,
                                          temperature=0.0, stream=True))
    types = [e.type for e in events]
    print(f"\nresponses stream: {len(events)} events: {sorted(set(types))}")
    assert types[0] == "response.created", types
    assert types[-1] == "response.completed", types
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1, types
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    final = events[-1].response  # type: ignore[union-attr]
    assert "".join(d.delta for d in deltas) == final.output_text  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.output_tokens > 0

    # Through the gateway tier (the bed's default) the usage reaches the controller's ledger with the tier's next
    # report (every 0.5 s), not with the answer.
    rows: list[dict[str, Any]] = []

    def ledger_counted_both() -> bool:
        out = bed.run("slinfer", "usage", "--key", key_id, "--format", "json").stdout
        rows[:] = [r for r in json.loads(out) if r["model"] == MODEL]
        return len(rows) == 1 and int(rows[0]["requests"]) >= 2

    waited = wait_until("the ledger counting both requests", ledger_counted_both, 10, 0.2)
    print(f"usage in the controller's ledger {waited:.2f} s after the answer")
    (row,) = rows
    assert row["requests"] == 2 and row["failed"] == 0 and row["estimated"] == 0, row
    assert row["prompt_tokens"] == plain.usage.input_tokens + final.usage.input_tokens, row
    assert row["completion_tokens"] == plain.usage.output_tokens + final.usage.output_tokens, row


def test_tokenize_then_detokenize_round_trips(bed: SlurmBed) -> None:
    text = "Slurm schedules GPUs for inference."
    status, tokens = _http(bed, "POST", "/tokenize", {"model": MODEL, "prompt": text, "add_special_tokens": False})
    assert status == 200, tokens
    assert tokens["count"] == len(tokens["tokens"]) > 3
    assert tokens["max_model_len"] == TINY_MAX_MODEL_LEN
    status, back = _http(bed, "POST", "/detokenize", {"model": MODEL, "tokens": tokens["tokens"]})
    assert status == 200, back
    assert back["prompt"] == text
    # The same auth as every route: no key, no tokens.
    status, body = _http(bed, "POST", "/tokenize", {"model": MODEL, "prompt": text}, key="not-a-key")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_streamed_completion_equals_the_engines_own_answer(bed: SlurmBed) -> None:
    (replica,) = _replicas(bed)
    direct = openai.OpenAI(base_url=str(replica["OPENAI_BASE_URL"]), api_key=str(replica["OPENAI_API_KEY"]))
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": "Slurm and GPUs", "max_tokens": 24, "temperature": 0.0}
    chunks = [c.choices[0].text for c in _client(bed).completions.create(stream=True, **kwargs) if c.choices]
    assert len([c for c in chunks if c]) > 1, "the stream came in one piece"
    assert "".join(chunks) == direct.completions.create(**kwargs).choices[0].text


def test_request_features_pass_through_and_an_engine_refusal_is_the_engines_own_error(bed: SlurmBed) -> None:
    client = _client(bed)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a GPU."}],
                                           n=2, max_tokens=8, seed=7, temperature=1.0, logprobs=True,
                                           top_logprobs=2, stop=["\n\n"])
    assert len(reply.choices) == 2 and {c.index for c in reply.choices} == {0, 1}
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert reply.usage is not None and reply.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in reply.choices if c.logprobs and c.logprobs.content)

    (replica,) = _replicas(bed)
    direct = openai.OpenAI(base_url=str(replica["OPENAI_BASE_URL"]), api_key=str(replica["OPENAI_API_KEY"]),
                           max_retries=0)
    # The tiny engine runs without --enable-auto-tool-choice: it refuses tool_choice="auto" itself.
    tools = [{"type": "function", "function": {"name": "gpu_count", "parameters": {"type": "object",
                                                                                  "properties": {}}}}]
    refusals = []
    for c in (client, direct):
        with pytest.raises(openai.BadRequestError) as caught:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=4,
                                      tools=tools, tool_choice="auto")  # type: ignore[arg-type]
        refusals.append(caught.value)
    via_gateway, from_engine = refusals
    print(f"\nengine refusal: {from_engine.message}")
    assert via_gateway.status_code == from_engine.status_code == 400
    # The engine's words, in OpenAI's shape (vLLM's "type": "BadRequestError", "code": 400 rewritten).
    assert isinstance(via_gateway.body, dict) and isinstance(from_engine.body, dict)
    assert via_gateway.body["message"] == from_engine.body["message"]
    assert via_gateway.body["type"] == "invalid_request_error" and via_gateway.body["code"] is None


def test_an_unserved_route_answers_an_openai_404_naming_the_served_routes(bed: SlurmBed) -> None:
    unserved = (("POST", "/v1/audio/speech"), ("GET", "/v1/responses/resp_1"), ("GET", "/v1/chat/completions"))
    for method, path in unserved:
        status, body = _http(bed, method, path, {"model": MODEL} if method == "POST" else None)
        assert status == 404, (path, body)
        error = body["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "not_found"
        for served in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses",
                       "POST /v1/embeddings", "POST /tokenize", "POST /detokenize", "GET /v1/models"):
            assert served in error["message"], error["message"]
    # vLLM serves no embeddings for a generative model: its router's bare 404 becomes an OpenAI error that names
    # what the model's engine does serve (from the engine's /openapi.json).
    status, body = _http(bed, "POST", "/v1/embeddings", {"model": MODEL, "input": "x"})
    assert status == 404, body
    error = body["error"]
    print(f"\nembeddings on tiny: {error['message']}")
    assert error["code"] == "not_found" and error["message"].startswith(
        f"The engine of model '{MODEL}' does not serve POST /v1/embeddings; it serves: ")
    served = error["message"].split("it serves: ", 1)[1].split(", ")
    # A generative engine serves Anthropic's /v1/messages too, and none of the pooling routes.
    assert served == ["POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses", "POST /tokenize",
                      "POST /detokenize", "POST /v1/messages"]


@pytest.mark.timeout(1800)
def test_structured_output_on_smollm2_follows_the_json_schema(bed: SlurmBed) -> None:
    # Fails (never skips) without the model: the catalog names it and its engine must start.
    assert (devcluster.smollm2_model_path() / "config.json").exists(), \
        f"smollm2 is not built at {devcluster.smollm2_model_path()} (make model)"
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
              "properties": {"city": {"type": "string", "minLength": 1}, "country": {"type": "string"},
                             "population": {"type": "integer", "minimum": 0}}}
    # Pinned to one replica first: on a busy 2-core machine its engine may take longer to load than the
    # gateway holds a request (queue_timeout_s), and its first guided decoding compiles the grammar.
    bed.run("slinfer", "scale", REAL_MODEL, "1")
    try:
        waited = wait_until(f"{REAL_MODEL} ready",
                            lambda: _status(bed, REAL_MODEL)["slinfer"]["state"] == "ready", 900, 2)
        print(f"\n{REAL_MODEL} ready after {waited:.0f} s")
        reply = _structured(bed, schema)
    finally:
        bed.run("slinfer", "scale", REAL_MODEL, "auto")
    text = reply.choices[0].message.content or ""
    print(f"\nsmollm2 structured output: {text}")
    data = json.loads(text)
    jsonschema.validate(data, schema)
    assert _status(bed, REAL_MODEL)["max_model_len"] == 2048


def _structured(bed: SlurmBed, schema: dict[str, Any]) -> Any:
    client = openai.OpenAI(base_url=bed.bed.env()["SLINFER_GATEWAY_URL"], api_key=bed.bed.env()["SLINFER_API_KEY"],
                           timeout=900, max_retries=0)
    return client.chat.completions.create(
        model=REAL_MODEL, temperature=0.0, max_tokens=80,
        messages=[{"role": "user", "content": "Give the capital of France as JSON with city, country and "
                                              "population."}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema,
                                                                "strict": True}})  # type: ignore[arg-type]
