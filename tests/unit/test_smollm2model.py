"""The smollm2 folder stored in float32: an older bf16 build is converted once, in place, to the same values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from slinfer.dev import smollm2model  # noqa: E402


def _bf16_folder(path: Path) -> dict[str, object]:
    weights = {"w": torch.tensor([1.0, -2.5, 3.140625, 1e-3], dtype=torch.bfloat16),
               "ids": torch.tensor([1, 2, 3], dtype=torch.int64)}
    safetensors_torch.save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "dtype": "bfloat16"}))
    return weights


def test_a_bf16_folder_is_converted_once_to_float32_with_the_same_values(tmp_path: Path) -> None:
    before = _bf16_folder(tmp_path)
    assert smollm2model.stored_dtype(tmp_path) == "bfloat16"

    assert smollm2model.ensure_float32(tmp_path) is True

    after = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert after["w"].dtype == torch.float32
    assert torch.equal(after["w"], before["w"].to(torch.float32))  # type: ignore[union-attr]
    assert after["ids"].dtype == torch.int64 and after["ids"].tolist() == [1, 2, 3]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"architectures": ["LlamaForCausalLM"], "dtype": "float32"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644

    mtime = (tmp_path / "model.safetensors").stat().st_mtime_ns
    assert smollm2model.ensure_float32(tmp_path) is False
    assert (tmp_path / "model.safetensors").stat().st_mtime_ns == mtime
