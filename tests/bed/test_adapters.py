"""Catalog LoRA adapters and the routes clients reach for, on the real bed (issue 33): the bed's `tiny-lora`
model lists a random adapter (slinfer.dev.tinylora, written here before the model's first engine starts);
through the controller's gateway, model=ADAPTER answers with the adapter's output and model=tiny-lora with the
base's, both from the one engine (its own /v1/models lists both); GET /v1/models/{id} for a model, an adapter
and an unknown id; Anthropic's /v1/messages plain and streamed through the `anthropic` client with its usage
in the ledger; an engine's error passed on in OpenAI's shape; and an adapter added to the catalog (the
controller restarted with it) served by the running engine, loaded at run time without restarting it; and one
added by a SIGHUP to the controller (a config reload), then dropped by another, unloaded from the same engine
and a 404 model_not_found; /v1/embeddings from the bed's pooling model (tiny with vLLM's --convert embed), its
usage in the ledger, and its engine's refusal of chat as an OpenAI 404 naming what it serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from slinfer.dev import devcluster, tinylora
from tests.bed.test_controller import _client
from tests.bed.test_openai_surface import _http
from tests.fakes.slurmbed import SlurmBed, engine_pids, wait_until

pytestmark = pytest.mark.bed
MODEL = "tiny-lora"
ADAPTER = "tiny-lora-a1"
# The adapter the catalog gains at run time.
LATE = "tiny-lora-a2"
# The adapter a SIGHUP adds and then drops (not LATE: the engine keeps LATE after its test's restart).
HUP = "tiny-lora-a3"
# The bed's pooling model: tiny served by vLLM with --convert embed.
EMBED = "tiny-embed"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def bed(slurm_bed: SlurmBed) -> Iterator[SlurmBed]:
    slurm_bed.cleanup_jobs()
    wait_until("no controller job left by an earlier module", lambda: not slurm_bed.controller_jobs(), 180)
    # Where the bed's catalog says the adapter is (slinfer/dev/templates/slinfer.toml.in).
    folder = slurm_bed.bed.state / "adapters"
    folder.mkdir(mode=0o755, exist_ok=True)
    tinylora.generate(devcluster.tiny_model_path(), folder / ADAPTER)
    # The pooling model's engine starts now, while the first tests use tiny-lora's (they mostly wait).
    slurm_bed.admin("scale", EMBED, "1")
    yield slurm_bed
    slurm_bed.retire_models(MODEL, EMBED)


def _complete(client: openai.OpenAI, model: str) -> str:
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0.0)
    return reply.choices[0].text


def _ledger(bed: SlurmBed, key_id: str, models: set[str]) -> dict[str, dict[str, Any]]:
    """The key's ledger rows by model, once each of `models` has one: through the gateway tier (the bed's
    default) usage reaches the controller's ledger with the tier's next report (every 0.5 s), not with the
    answer."""
    rows: dict[str, dict[str, Any]] = {}

    def counted() -> bool:
        out = bed.run("slinfer", "usage", "--key", key_id, "--format", "json").stdout
        rows.clear()
        rows.update((r["model"], r) for r in json.loads(out))
        return models <= set(rows)

    wait_until(f"the ledger counting {sorted(models)}", counted, 10, 0.2)
    return rows


def _engine(bed: SlurmBed) -> dict[str, object]:
    """The one READY engine of MODEL: its env file and its own /v1/models listing (only MODEL's jobs: the env file
    of tiny-embed's job, cancelled after its test, names an engine that is gone)."""
    for replica in ({"job": job, **bed.env_file(job)} for job in bed.controller_jobs(MODEL) if bed.env_file(job)):
        base, key = str(replica["OPENAI_BASE_URL"]), str(replica["OPENAI_API_KEY"])
        request = urllib.request.Request(f"{base}/models", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            listing = json.load(response)["data"]
        if any(m["id"] == MODEL for m in listing):
            return {**replica, "models": listing}
    raise AssertionError(f"no engine of {MODEL}")


def test_the_adapter_and_its_base_answer_differently_from_one_engine(bed: SlurmBed) -> None:
    client = _client(bed)
    base = _complete(client, MODEL)  # scales MODEL from zero
    adapted = _complete(client, ADAPTER)
    print(f"\nbase: {base!r}\nadapter: {adapted!r}")
    assert base and adapted and adapted != base
    # Deterministic at temperature 0: the difference is the adapter's, not noise.
    assert _complete(client, MODEL) == base and _complete(client, ADAPTER) == adapted
    assert len(bed.controller_jobs(MODEL)) == 1
    engine = _engine(bed)
    listed = {m["id"]: m for m in engine["models"]}  # type: ignore[union-attr]
    assert listed[ADAPTER]["parent"] == MODEL, listed
    # The engine answers the adapter itself with the gateway's answer (the gateway sent it there unchanged).
    direct = openai.OpenAI(base_url=str(engine["OPENAI_BASE_URL"]), api_key=str(engine["OPENAI_API_KEY"]),
                           max_retries=0)
    assert _complete(direct, ADAPTER) == adapted


def test_models_retrieve_a_model_an_adapter_and_an_unknown_id(bed: SlurmBed) -> None:
    client = _client(bed)
    assert client.models.retrieve(MODEL).id == MODEL
    adapter = client.models.retrieve(ADAPTER)
    assert adapter.id == ADAPTER and adapter.model_extra is not None and adapter.model_extra["parent"] == MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body == {"message": "The model 'no-such-model' does not exist; GET /v1/models lists the "
                                 "models served here.", "type": "invalid_request_error", "param": None,
                                 "code": "model_not_found"}


def test_messages_plain_and_streamed_with_the_anthropic_client_and_usage_in_the_ledger(bed: SlurmBed) -> None:
    created = bed.run("slinfer", "keys", "create", "messages-test").stdout
    key_id = re.search(r"key id: (\S+)", created).group(1)  # type: ignore[union-attr]
    secret = re.search(r"secret: (\S+)", created).group(1)  # type: ignore[union-attr]
    root = bed.bed.env()["SLINFER_GATEWAY_URL"].removesuffix("/v1")
    client = anthropic.Anthropic(base_url=root, api_key=secret, timeout=300, max_retries=0)
    messages = [{"role": "user", "content": "Tell me about Slurm."}]
    plain = client.messages.create(model=MODEL, max_tokens=8, messages=messages)  # type: ignore[arg-type]
    assert plain.type == "message" and plain.content and plain.usage.input_tokens > 0
    assert plain.usage.output_tokens > 0
    with client.messages.stream(model=ADAPTER, max_tokens=8, messages=messages) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    print(f"\nmessages: plain {plain.usage}, streamed {final.usage}: {text!r}")
    assert final.usage.output_tokens > 0
    rows = _ledger(bed, key_id, {MODEL, ADAPTER})
    assert rows[MODEL]["requests"] == 1 and rows[MODEL]["estimated"] == 0, rows
    assert rows[MODEL]["prompt_tokens"] == plain.usage.input_tokens, rows
    assert rows[MODEL]["completion_tokens"] == plain.usage.output_tokens, rows
    # The stream's counts, from its message_start and message_delta events, under the adapter's name.
    assert rows[ADAPTER]["requests"] == 1 and rows[ADAPTER]["estimated"] == 0, rows
    assert rows[ADAPTER]["completion_tokens"] == final.usage.output_tokens, rows
    assert rows[ADAPTER]["prompt_tokens"] == final.usage.input_tokens > 0, rows


def test_an_engine_error_is_passed_on_in_openais_shape(bed: SlurmBed) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100000}
    status, via_gateway = _http(bed, "POST", "/v1/completions", body)
    engine = _engine(bed)
    request = urllib.request.Request(f"{engine['OPENAI_BASE_URL']}/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {engine['OPENAI_API_KEY']}",
                                              "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    from_engine = json.load(caught.value)
    print(f"\nengine: {from_engine}\ngateway: {via_gateway}")
    assert status == caught.value.code == 400
    # vLLM's own shape names its exception class and repeats the status as the code; OpenAI's does not.
    assert from_engine["error"]["type"] == "BadRequestError" and from_engine["error"]["code"] == 400
    assert via_gateway == {"error": {"message": from_engine["error"]["message"], "type": "invalid_request_error",
                                     "param": from_engine["error"].get("param"), "code": None}}


def _restart_controller(bed: SlurmBed) -> None:
    devcluster.stop_daemon(bed.bed, "controller")
    devcluster.start_controller(bed.bed)
    # The gateway tier's workers read the catalog from the file themselves: a site reloads them too.
    devcluster.reload_tier(bed.bed)
    wait_until(f"{MODEL} routable again", lambda: bed.ready_replicas(MODEL) == 1, 120)


def test_an_adapter_added_to_the_catalog_is_loaded_into_the_running_engine(bed: SlurmBed) -> None:
    client = _client(bed)
    base = _complete(client, MODEL)
    first = _complete(client, ADAPTER)
    jobs = bed.controller_jobs(MODEL)
    before = _engine(bed)
    assert LATE not in {m["id"] for m in before["models"]}  # type: ignore[union-attr]
    source = tinylora.generate(devcluster.tiny_model_path(), bed.bed.state / "adapters" / LATE, seed=2)
    original = bed.bed.config.read_text()
    assert original.rstrip().endswith(f'name = "{ADAPTER}"\nsource = "{bed.bed.state}/adapters/{ADAPTER}"'), \
        "the bed's catalog no longer ends with tiny-lora's adapter as this test expects"
    try:
        bed.bed.config.write_text(original + f'\n[[models.adapters]]\nname = "{LATE}"\nsource = "{source}"\n')
        _restart_controller(bed)
        client = _client(bed)
        began = time.monotonic()
        late = _complete(client, LATE)
        print(f"\nlate adapter: {late!r}, first request {time.monotonic() - began:.2f} s (load included)")
        assert late and late not in (base, first)
        # The same engine (job and address), which now lists the adapter: loaded, not restarted.
        after = _engine(bed)
        assert bed.controller_jobs(MODEL) == jobs
        assert after["OPENAI_BASE_URL"] == before["OPENAI_BASE_URL"]
        assert {m["id"]: m.get("parent") for m in after["models"]}[LATE] == MODEL  # type: ignore[union-attr]
        assert _complete(client, MODEL) == base and _complete(client, ADAPTER) == first
    finally:
        bed.bed.config.write_text(original)
        _restart_controller(bed)

def test_embeddings_from_a_pooling_model_with_usage_in_the_ledger_and_no_chat(bed: SlurmBed) -> None:
    created = bed.run("slinfer", "keys", "create", "embeddings-test").stdout
    key_id = re.search(r"key id: (\S+)", created).group(1)  # type: ignore[union-attr]
    secret = re.search(r"secret: (\S+)", created).group(1)  # type: ignore[union-attr]
    client = openai.OpenAI(base_url=bed.bed.env()["SLINFER_GATEWAY_URL"], api_key=secret, timeout=300,
                           max_retries=0)
    began = time.monotonic()
    reply = client.embeddings.create(model=EMBED, input=[PROMPT, "Slurm"])
    print(f"\nfirst embeddings (engine start included): {time.monotonic() - began:.1f} s, usage {reply.usage}")
    # One vector per input, of tiny's hidden size (128), and the two inputs' vectors differ.
    assert [len(d.embedding) for d in reply.data] == [128, 128]
    assert reply.data[0].embedding != reply.data[1].embedding and reply.usage.prompt_tokens > 0
    rows = _ledger(bed, key_id, {EMBED})
    assert rows[EMBED]["requests"] == 1 and rows[EMBED]["estimated"] == 0, rows
    assert (rows[EMBED]["prompt_tokens"], rows[EMBED]["completion_tokens"]) == (reply.usage.prompt_tokens, 0), rows
    # The engine serves no chat: its router's bare 404 becomes OpenAI's, naming the routes it does serve.
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    message = str(caught.value.body["message"])  # type: ignore[index]
    print(f"chat on {EMBED}: {message}")
    assert caught.value.code == "not_found" and message.startswith(
        f"The engine of model '{EMBED}' does not serve POST /v1/chat/completions; it serves: ")
    assert "POST /v1/embeddings" in message and "POST /v1/chat/completions" not in message.split("serves: ")[1]
    bed.admin("scale", EMBED, "0")  # its engine is done: the node's CPUs and GPUs go back to the next tests

def _hangup(bed: SlurmBed) -> float:
    """SIGHUP to the bed's controller (a reload, controller/reload.py) and to its gateway tier, whose workers read
    the catalog from the file themselves (`systemctl reload slinfer-controller slinfer-gateway`); returns when
    the controller's was sent, once the tier's workers were replaced."""
    pid = devcluster.daemon_pid(bed.bed, "controller")
    assert pid, "the bed's controller is not running"
    os.kill(pid, signal.SIGHUP)
    sent = time.monotonic()
    devcluster.reload_tier(bed.bed)
    return sent


def test_sighup_adds_then_drops_an_adapter_on_the_running_engine(bed: SlurmBed) -> None:
    client = _client(bed)
    base, first = _complete(client, MODEL), _complete(client, ADAPTER)
    jobs, before = bed.controller_jobs(MODEL), _engine(bed)
    controller = devcluster.daemon_pid(bed.bed, "controller")
    source = tinylora.generate(devcluster.tiny_model_path(), bed.bed.state / "adapters" / HUP, seed=3)
    original = bed.bed.config.read_text()
    with pytest.raises(openai.NotFoundError):
        _complete(client, HUP)  # not in the catalog yet (positive control of the 404 after the drop)
    try:
        bed.bed.config.write_text(original + f'\n[[models.adapters]]\nname = "{HUP}"\nsource = "{source}"\n')
        sent, answer = _hangup(bed), ""
        client = _client(bed)  # new connections: the tier's workers that read the file again
        while not answer:
            try:
                answer = _complete(client, HUP)
            except openai.NotFoundError:
                assert time.monotonic() - sent < 30, f"{HUP} not served 30 s after the SIGHUP"
                time.sleep(0.05)
        added_s = time.monotonic() - sent
        assert answer not in (base, first)
        # The same engine (job and address) now lists it, and the same controller process served it.
        after = _engine(bed)
        assert bed.controller_jobs(MODEL) == jobs and after["OPENAI_BASE_URL"] == before["OPENAI_BASE_URL"]
        assert {m["id"]: m.get("parent") for m in after["models"]}[HUP] == MODEL  # type: ignore[union-attr]
        assert devcluster.daemon_pid(bed.bed, "controller") == controller
        bed.bed.config.write_text(original)
        sent = _hangup(bed)
        client = _client(bed)
        wait_until(f"{HUP} unloaded from the engine",
                   lambda: HUP not in {m["id"] for m in _engine(bed)["models"]}, 30, 0.05)  # type: ignore[union-attr]
        unloaded_s = time.monotonic() - sent
        print(f"\nSIGHUP -> {HUP} answering: {added_s:.2f} s; SIGHUP -> unloaded: {unloaded_s:.2f} s")
        with pytest.raises(openai.NotFoundError) as caught:
            _complete(client, HUP)
        assert caught.value.code == "model_not_found"
        assert HUP not in {m.id for m in client.models.list()}
        # Still the same engine and controller, and the base and the first adapter answer as before.
        assert bed.controller_jobs(MODEL) == jobs and _engine(bed)["OPENAI_BASE_URL"] == before["OPENAI_BASE_URL"]
        assert devcluster.daemon_pid(bed.bed, "controller") == controller
        assert _complete(client, MODEL) == base and _complete(client, ADAPTER) == first
    finally:
        if bed.bed.config.read_text() != original:
            bed.bed.config.write_text(original)
            _hangup(bed)


def _sbatch_refused(bed: SlurmBed, *args: str) -> str:
    """sbatch as Alice, which must refuse at submit (no job): its stderr."""
    done = bed.as_user(devcluster.BED_USERS[0], "sbatch", "--parsable", *args, "--wrap", "echo SCRIPT_RAN")
    assert done.returncode != 0 and not done.stdout.strip(), (done.stdout, done.stderr)
    return done.stderr


def test_a_users_own_adapter_in_her_private_job(bed: SlurmBed) -> None:
    """`--inference-lora=NAME=PATH`: Alice makes an adapter in her home as herself and serves it on her own
    tiny-lora job's engine, where model=NAME answers differently from the base; her job's key reaches it, no
    other key does, and the gateway does not route it. A malformed value is refused by sbatch naming the problem;
    a folder she cannot read (Bob's, 0700, which root reads) fails her job with the reason, no engine, no drain."""
    alice, bob = devcluster.BED_USERS
    began = time.monotonic()
    home = Path(f"/home/{alice}")
    mine = home / f"slinfer-test-lora-{os.getpid()}"
    scratch = Path(tempfile.mkdtemp(prefix="slinfer-test-lora-"))
    scratch.chmod(0o755)
    theirs = scratch / "bob-private"
    jobs: list[str] = []
    try:
        made = bed.as_user(alice, sys.executable, "-m", "slinfer.dev.tinylora", str(devcluster.tiny_model_path()),
                           str(mine), timeout=120)
        assert made.returncode == 0 and mine.stat().st_uid == mine.parent.stat().st_uid, made.stderr
        tinylora.generate(devcluster.tiny_model_path(), theirs, seed=4)
        subprocess.run(["chown", "-R", f"{bob}:{bob}", str(theirs)], check=True)
        theirs.chmod(0o700)
        assert (theirs / "adapter_config.json").read_bytes(), "root reads Bob's folder (the control)"
        assert bed.as_user(alice, "cat", str(theirs / "adapter_config.json")).returncode != 0

        # Refused at submit, naming the problem; the plugin's rule is tests/unit/test_inference_lora.py's table.
        err = _sbatch_refused(bed, f"--inference={MODEL}", "--gres=gpu:1", "--inference-lora=mine=adapter")
        assert ('slinfer: invalid --inference-lora value "mine=adapter": the path must be absolute '
                "(start with '/')") in err, err
        err = _sbatch_refused(bed, f"--inference={MODEL}", "--gres=gpu:1", f"--inference-lora=a;b={mine}")
        assert "character ';' is not allowed in the adapter name" in err, err
        err = _sbatch_refused(bed, f"--inference={MODEL}", "--gres=gpu:1", f"--inference-lora=x={mine}",
                              f"--inference-lora=x={mine}")
        assert 'slinfer: --inference-lora names adapter "x" twice' in err, err
        assert "slinfer: --inference-lora needs --inference=MODEL" in _sbatch_refused(
            bed, f"--inference-lora=x={mine}")

        script = "slinfer wait-ready --timeout 300 && echo READY && sleep 600"
        refused = bed.sbatch(f"--inference={MODEL}", "--gres=gpu:1", f"--inference-lora=theirs={theirs}",
                             script="echo SCRIPT_RAN")
        served = bed.sbatch(f"--inference={MODEL}", "--gres=gpu:1", f"--inference-lora=mine={mine}",
                            f"--inference-lora=mine2={mine}", script=script)
        jobs += [refused, served]
        assert bed.wait_state(refused, {"FAILED", "COMPLETED"}, 60) == "FAILED"
        out = bed.output(refused)
        assert (f"slinfer: --inference-lora theirs={theirs}: {alice} cannot read it (Permission denied: "
                f"{theirs}/adapter_config.json)") in out, out
        assert "SCRIPT_RAN" not in out and engine_pids(refused) == []
        state = bed.node_state()
        assert "drain" not in state and "down" not in state, bed.node_reason()

        bed.wait_output(served, r"READY", 300)
        env = bed.env_file(served)
        engine = openai.OpenAI(base_url=env["OPENAI_BASE_URL"], api_key=env["OPENAI_API_KEY"], max_retries=0)
        listed = {m.id: m.model_extra for m in engine.models.list()}
        assert listed["mine"]["parent"] == MODEL and listed["mine2"]["parent"] == MODEL, listed  # type: ignore[index]
        base, adapted = _complete(engine, MODEL), _complete(engine, "mine")
        print(f"\nprivate job: base {base!r}, her adapter {adapted!r}; "
              f"sbatch checks + failed job + start + answers: {time.monotonic() - began:.1f} s")
        assert base and adapted and adapted != base
        assert _complete(engine, "mine") == adapted and _complete(engine, "mine2") == adapted
        # Her job's key only: another key is refused by the engine; the gateway does not route her adapter.
        with pytest.raises(openai.AuthenticationError):
            _complete(openai.OpenAI(base_url=env["OPENAI_BASE_URL"], api_key="not-her-key", max_retries=0), "mine")
        with pytest.raises(openai.NotFoundError):
            _complete(_client(bed), "mine")
    finally:
        for job in jobs:
            bed.run("scancel", job, check=False)
        shutil.rmtree(mine, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    for job in jobs:
        bed.wait_state(job, {"CANCELLED", "FAILED", "COMPLETED"}, 60)
        wait_until(f"no engine of job {job} left", lambda job=job: not engine_pids(job), 60)
    print(f"whole test: {time.monotonic() - began:.1f} s")
