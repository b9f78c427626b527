"""Whether a user may submit where the catalog says: the associations slurmdbd holds, and the partitions' own
allow and deny lists, checked before the first job rather than learned from sbatch's refusals.

Responsible for: the queries (`sacctmgr show assoc user=U`, `sacctmgr show user U` for the default account,
`scontrol show partition P`), their parsing, and the check of one model's account, partition and QOS against
them, as problems that name the model, the config key and what is missing.
Not responsible for: running the queries (runner.py), deciding what a failed check does (the controller fails
to start), the site's order itself (sacctmgr, or the bed's accounting.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from slinfer.slurm import parse
from slinfer.slurm.runner import Query


@dataclass(frozen=True)
class Association:
    """One row of `sacctmgr show assoc`: an account (and a partition, empty for all) with its QOS."""

    account: str
    partition: str
    qos: frozenset[str]


def _associations(text: str) -> list[Association]:
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        account, partition, qos = [*line.split("|"), "", ""][:3]
        rows.append(Association(account, partition, frozenset(q for q in qos.split(",") if q)))
    return rows


def associations(user: str) -> Query[list[Association]]:
    """The user's associations, with the QOS each may use (inherited ones included, as sacctmgr shows them)."""
    return Query(("sacctmgr", "--noheader", "--parsable2", "show", "assoc", f"user={user}",
                  "format=account,partition,qos"), _associations)


def default_account(user: str) -> Query[str]:
    return Query(("sacctmgr", "--noheader", "--parsable2", "show", "user", user, "format=defaultaccount"),
                 lambda text: text.strip().splitlines()[0] if text.strip() else "")


def partition(name: str) -> Query[dict[str, str]]:
    """A partition's record (AllowAccounts, DenyAccounts, AllowQos, DenyQos, ...); fails when there is none."""
    return Query(("scontrol", "-o", "show", "partition", name), parse.record)


def _listed(value: str) -> set[str]:
    return {v for v in value.split(",") if v and v != "(null)"}


@dataclass(frozen=True)
class Wanted:
    """Where one catalog model's jobs go: its index (for the config key), name, account, partition and QOS."""

    index: int
    model: str
    account: str
    partition: str
    qos: Sequence[tuple[str, str]]  # (config key's last part, QOS): ("qos", "normal"), ("burst_qos", ...)


def problems(user: str, wanted: Wanted, rows: Sequence[Association], default: str,
             partitions: Mapping[str, dict[str, str] | None]) -> list[str]:
    """What stops `user` from submitting `wanted`'s jobs; empty when nothing does."""
    key = f"models[{wanted.index}]"
    account = wanted.account or default
    where = f"on partition {wanted.partition!r}" if wanted.partition else "on any partition"
    found = []
    record = partitions.get(wanted.partition) if wanted.partition else {}
    if wanted.partition and record is None:
        found.append(f"{key}.partition: model {wanted.model!r} names partition {wanted.partition!r}, which Slurm "
                     f"does not have (scontrol show partition {wanted.partition})")
        record = {}
    record = record or {}
    usable = [r for r in rows if r.account == account and (not r.partition or r.partition == wanted.partition
                                                            or not wanted.partition)]
    if not usable:
        found.append(f"{key}.account: model {wanted.model!r} runs under account {account!r}, but the controller's "
                     f"user {user!r} has no association with it {where} (sacctmgr show assoc user={user})")
    allow, deny = _listed(record.get("AllowAccounts", "ALL")), _listed(record.get("DenyAccounts", ""))
    if account and (("ALL" not in allow and account not in allow) or account in deny):
        found.append(f"{key}.account: partition {wanted.partition!r} does not allow account {account!r} "
                     f"(AllowAccounts={record.get('AllowAccounts', '')}, "
                     f"DenyAccounts={record.get('DenyAccounts', '')})")
    allow_q, deny_q = _listed(record.get("AllowQos", "ALL")), _listed(record.get("DenyQos", ""))
    for name, qos in wanted.qos:
        if usable and not any(qos in r.qos for r in usable):
            found.append(f"{key}.{name}: model {wanted.model!r} asks for QOS {qos!r}, but the association of "
                         f"{user!r} with account {account!r} allows only {', '.join(sorted(usable[0].qos)) or 'none'} "
                         f"(sacctmgr show assoc user={user} format=account,partition,qos)")
        if ("ALL" not in allow_q and qos not in allow_q) or qos in deny_q:
            found.append(f"{key}.{name}: partition {wanted.partition!r} does not allow QOS {qos!r} "
                         f"(AllowQos={record.get('AllowQos', '')}, DenyQos={record.get('DenyQos', '')})")
    return found
