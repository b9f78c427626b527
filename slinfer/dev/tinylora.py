"""Makes random LoRA adapters for the tiny Llama, for the adapters' bed test and benchmark.

Responsible for: writing a PEFT-format adapter folder (adapter_config.json, adapter_model.safetensors) for the
tiny model's attention projections, with weights large enough that its temperature-0 output differs from the
base model's (PEFT's own default init makes lora_B zero, which changes nothing), readable by every user (the
engine runs as the service's user). No peft needed: the format is two files.
Not responsible for: the tiny model itself (tinymodel.py), or serving the adapter (the catalog, vLLM).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# The projections the adapter changes, in the model's module names (vLLM's Llama supports these for LoRA).
TARGETS = ("q_proj", "v_proj", "o_proj")
# The adapter's rank: small (vLLM's --max-lora-rank must be at least this), and LoRA's alpha (scale alpha/r).
RANK = 8
ALPHA = 16
# The spread of the random weights: the tiny model's own are about 0.02, so the adapter's change dominates.
STD = 0.5


def generate(base: Path, out: Path, seed: int = 1, rank: int = RANK) -> Path:
    """Writes a random adapter of rank `rank` for the model at `base` into `out`; returns `out`."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // int(config["num_attention_heads"]))
    outs = {"q_proj": int(config["num_attention_heads"]) * head_dim,
            "v_proj": int(config["num_key_value_heads"]) * head_dim, "o_proj": hidden}
    ins = {"q_proj": hidden, "v_proj": hidden, "o_proj": int(config["num_attention_heads"]) * head_dim}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(int(config["num_hidden_layers"])):
        for target in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, ins[target], generator=generator) * STD
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(outs[target], rank, generator=generator) * STD
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank,
        "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": list(TARGETS), "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "inference_mode": True}, indent=1))
    os.chmod(out, 0o755)
    for path in out.iterdir():
        os.chmod(path, 0o644)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make a random LoRA adapter for the tiny model.")
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rank", type=int, default=RANK)
    args = parser.parse_args(argv)
    print(generate(args.base, args.out, args.seed, args.rank))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
