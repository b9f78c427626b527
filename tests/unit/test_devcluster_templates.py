"""The bed's generated files come from slinfer/dev/templates (issue 28): rendered for a bed of one node, of two
nodes and of one node on a 24.11 release root, they are byte for byte what the f-strings wrote before the
templates (tests/unit/data/devcluster/, captured from that code with the same fixed paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slinfer.dev import devcluster
from slinfer.slurm.release import SlurmRoot
from slinfer.tls import Issued

GOLDEN = Path(__file__).parent / "data" / "devcluster"
CA = Path("/state/tls/ca.pem")
SERVER = Issued(Path("/state/tls/controller.pem"), Path("/state/tls/controller.key"))
CLIENT = Issued(Path("/state/tls/agent.pem"), Path("/state/tls/agent.key"))
HOOK = "/usr/libexec/slinfer-hook"
CASES = {"one": devcluster.Bed(Path("/state"), 16800, slurm="", gateway="tier"),
         "two": devcluster.Bed(Path("/state"), 30400, gpus=2, slurm="", nodes=2, gateway="tier"),
         "one-2411": devcluster.Bed(Path("/state"), 16900, slurm="/opt/slurm/24.11", gateway="tier")}


@pytest.fixture(autouse=True)
def fixed_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paths the capture used: none may come from this machine's venv, Slurm or environment."""
    monkeypatch.setenv("SLINFER_TINY_MODEL", "/models/tiny")
    monkeypatch.setenv("SLINFER_SMOLLM2_MODEL", "/models/smollm2")
    monkeypatch.setenv("SLINFER_SPANK_PLUGIN", "/opt/spank_slinfer.so")
    monkeypatch.delenv("SLINFER_ENGINE_PYTHON", raising=False)
    monkeypatch.setattr(devcluster, "_bin_dir", lambda: Path("/opt/venv/bin"))
    monkeypatch.setattr(devcluster.Bed, "release", lambda self: "22.05")
    monkeypatch.setattr(SlurmRoot, "release", property(lambda self: "24.11"))


def rendered(name: str, bed: devcluster.Bed) -> dict[str, str]:
    files = {f"{name}.slurm.conf": devcluster._slurm_conf(bed, "myhost"),
             f"{name}.gres.conf": devcluster._gres_conf(bed)}
    for node in bed.node_names:
        files[f"{name}.{node}.plugstack.conf"] = devcluster._plugstack_conf(bed, node, HOOK)
        files[f"{name}.{node}.slinfer.toml"] = devcluster._slinfer_toml(bed, node, "TOKEN", CA, SERVER, CLIENT)
    return files


@pytest.mark.parametrize("name", sorted(CASES))
def test_templates_render_what_the_code_wrote_before(name: str) -> None:
    files = rendered(name, CASES[name])
    assert len(files) == 2 + 2 * CASES[name].nodes
    for file, text in files.items():
        assert text == (GOLDEN / file).read_text(), file


def test_cgroup_conf_is_the_template_as_it_was() -> None:
    assert devcluster.render("cgroup.conf.in") == (GOLDEN / "cgroup.conf").read_text()


def test_the_cases_differ_where_the_bed_does() -> None:
    """Positive control: the comparison sees the nodes, the release and the node's name, not a constant text."""
    one, two, r2411 = (rendered(name, CASES[name]) for name in ("one", "two", "one-2411"))
    assert "SwitchType=switch/none" in one["one.slurm.conf"]
    assert "SwitchType" not in r2411["one-2411.slurm.conf"]
    assert "JobRequeue=0" in two["two.slurm.conf"] and "JobRequeue" not in one["one.slurm.conf"]
    assert "for the node slinfer-dev-2" in two["two.slinfer-dev-2.slinfer.toml"]
    assert two["two.slinfer-dev-1.slinfer.toml"] != two["two.slinfer-dev-2.slinfer.toml"]


def test_a_placeholder_without_a_value_is_an_error() -> None:
    with pytest.raises(KeyError, match="account"):
        devcluster.render("site-order.toml.in")


def test_every_template_is_used() -> None:
    folder = Path(devcluster.__file__).parent / "templates"
    source = Path(devcluster.__file__).read_text()
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["cgroup.conf.in", "gres.conf.in", "plugstack.conf.in", "site-order.toml.in",
                     "slinfer.toml.in", "slurm.conf.in"]
    for name in names:
        assert f'"{name}"' in source, name
