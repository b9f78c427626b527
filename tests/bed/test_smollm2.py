"""A real model answers correctly through slinfer: SmolLM2-135M-Instruct served by the controller's own Slurm job,
asked at temperature 0 through the gateway and directly at its engine. The answers must be right (Paris), equal
on both paths and in both modes (streaming or not), and the usage the gateway's ledger records must equal what the
engine itself counted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from slinfer.agent.pagecache import sized_files
from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed, wait_until

pytestmark = pytest.mark.bed
MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# An engine of 135M parameters starts in about a minute here, several on a machine that others share.
READY_TIMEOUT = 600


@dataclass
class Served:
    bed: SlurmBed
    job: str
    engine_url: str  # the engine's own OpenAI base URL, .../v1
    engine_key: str

    def gateway(self) -> openai.OpenAI:
        env = self.bed.bed.env()
        return openai.OpenAI(base_url=env["SLINFER_GATEWAY_URL"], api_key=env["SLINFER_API_KEY"], timeout=300,
                             max_retries=0)

    def engine(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.engine_url, api_key=self.engine_key, timeout=300, max_retries=0)


def _slinfer(bed: SlurmBed, *args: str) -> str:
    return subprocess.run([f"{sys.prefix}/bin/slinfer", *args], env=bed.env(), check=True, capture_output=True,
                          text=True, timeout=30).stdout


def _engine_tokens(base_url: str) -> tuple[float, float]:
    """(prompt, generated) tokens the engine counted itself, from its /metrics."""
    with urllib.request.urlopen(f"{base_url.removesuffix('/v1')}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals = {"vllm:prompt_tokens_total": 0.0, "vllm:generation_tokens_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["vllm:prompt_tokens_total"], totals["vllm:generation_tokens_total"]


def _ledger(bed: SlurmBed) -> tuple[int, int, int]:
    """(requests, prompt tokens, completion tokens) the gateway's ledger holds for the model, pending sums too."""
    rows = [r for r in json.loads(_slinfer(bed, "usage", "--format", "json")) if r["model"] == MODEL]
    return (sum(r["requests"] for r in rows), sum(r["prompt_tokens"] for r in rows),
            sum(r["completion_tokens"] for r in rows))


@pytest.fixture(scope="module")
def served(slurm_bed: SlurmBed) -> Iterator[Served]:
    """One smollm2 replica for the whole module, started the way the service starts them: the controller's own
    `sbatch --inference=smollm2 --inference-pool` job (pinned at one, so nothing else comes or goes)."""
    slurm_bed.cleanup_jobs()
    _slinfer(slurm_bed, "scale", MODEL, "1")
    try:
        waited = wait_until("a READY smollm2 replica", lambda: slurm_bed.ready_replicas(MODEL) == 1, READY_TIMEOUT)
        (job,) = slurm_bed.controller_jobs(MODEL)
        env = slurm_bed.env_file(job)
        print(f"\nsmollm2: controller's job {job} READY and routable {waited:.0f}s after `slinfer scale {MODEL} 1`")
        yield Served(slurm_bed, job, env["OPENAI_BASE_URL"], env["OPENAI_API_KEY"])
    finally:
        slurm_bed.retire_models(MODEL)


def test_factual_question_is_answered_right_and_the_same_through_the_gateway_and_directly(served: Served) -> None:
    via_gateway = served.gateway().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                           max_tokens=40)
    direct = served.engine().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    answer = via_gateway.choices[0].message.content or ""
    print(f"\ngateway: {answer!r}; engine: {direct.choices[0].message.content!r}")
    assert "Paris" in answer
    assert answer == direct.choices[0].message.content
    assert via_gateway.choices[0].finish_reason == direct.choices[0].finish_reason == "stop"
    assert via_gateway.usage == direct.usage
    # The engine is not open to anyone: only its own key is accepted.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.engine_url, api_key="sk-wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=4)


def test_streaming_gives_the_same_text_and_usage_as_non_streaming(served: Served) -> None:
    messages = [{"role": "user", "content": "Name three planets of the solar system and say one fact about each."}]
    # Forty-eight tokens: enough for many chunks, few enough for a machine that others share.
    kwargs = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 48}
    whole = served.gateway().chat.completions.create(**kwargs)  # type: ignore[call-overload]
    for name, client in (("gateway", served.gateway()), ("engine", served.engine())):
        stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                **kwargs)  # type: ignore[call-overload]
        pieces, finish, usage = [], None, None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        print(f"\n{name}: {len([p for p in pieces if p])} content chunks, finish {finish}, usage {usage}")
        assert len([p for p in pieces if p]) > 10, "the stream came in a few pieces"
        assert "".join(pieces) == whole.choices[0].message.content
        assert finish == whole.choices[0].finish_reason
        assert usage == whole.usage


def test_usage_in_the_ledger_equals_the_engines_own_count(served: Served) -> None:
    # Only this test talks to the engine now, so its /metrics deltas are exactly these requests.
    requests_before, prompt_before, completion_before = _ledger(served.bed)
    engine_prompt_before, engine_generated_before = _engine_tokens(served.engine_url)
    told_prompt = told_completion = 0
    client = served.gateway()
    questions = ["What is the capital of Italy?", "Write a haiku about clusters.", "What is two plus two?",
                 "Explain what a GPU is in two sentences."]
    for i, question in enumerate(questions):
        kwargs = {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0,
                  "max_tokens": 24}
        if i % 2:
            stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                    **kwargs)  # type: ignore[call-overload]
            usage = [c.usage for c in stream if c.usage][-1]
        else:
            usage = client.chat.completions.create(**kwargs).usage  # type: ignore[call-overload]
        assert usage is not None
        told_prompt += usage.prompt_tokens
        told_completion += usage.completion_tokens
    # The ledger and the engine's counters may lag the answers by a moment.
    deadline = time.monotonic() + 20
    while True:
        requests, prompt, completion = _ledger(served.bed)
        recorded = (requests - requests_before, prompt - prompt_before, completion - completion_before)
        engine_prompt, engine_generated = _engine_tokens(served.engine_url)
        engine_counted = (engine_prompt - engine_prompt_before, engine_generated - engine_generated_before)
        if ((recorded, engine_counted) == ((len(questions), told_prompt, told_completion),
                                           (told_prompt, told_completion)) or time.monotonic() > deadline):
            break
        time.sleep(0.5)
    print(f"\nledger {recorded}; answers told ({len(questions)}, {told_prompt}, {told_completion}); "
          f"engine's /metrics {engine_counted}")
    assert told_completion > 4 * 5 and told_prompt > 4 * 10
    assert recorded == (len(questions), told_prompt, told_completion)
    assert engine_counted == (told_prompt, told_completion)


def test_the_node_is_serving_smollm2_from_the_models_built_folder(served: Served) -> None:
    """The engine serves the folder `make model` built (not the tiny model under another name)."""
    models = served.engine().models.list().model_dump()["data"]
    assert [m["id"] for m in models] == [MODEL]
    assert models[0]["root"] == str(devcluster.smollm2_model_path())
    assert models[0]["max_model_len"] == 2048


def test_the_agent_read_smollm2_into_the_page_cache_at_its_start_and_for_the_job(served: Served) -> None:
    """The catalog's `readahead = true`: the node's agent read every file of the model at its start and again
    beside the job's engine start, and logged what it read."""
    files, size = sized_files(str(devcluster.smollm2_model_path()))
    megabytes = size / 1e6
    log = served.bed.bed.logs / "agent.log"
    for why in ("agent start", f"job {served.job}"):
        line = f"model {MODEL}: read ahead ({why}): {len(files)} files, {megabytes:.1f} MB in "
        wait_until(f"the agent's line {line!r}", lambda line=line: line in log.read_text(errors="replace"), 60)
