"""Generates the tiny Llama that the demo, the tests and the benchmarks serve with real vLLM.

Random weights and a byte-level BPE tokenizer trained on a few lines: nothing comes from a model hub. The answers
are gibberish, but every layer of the serving path (tokenizer, chat template, scheduler, sampler, streaming) is
real. The seed makes the weights reproducible, so temperature-0 answers are stable across runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "Slurm schedules jobs on the nodes of a cluster.",
    "An inference engine answers requests for a language model.",
    "The gateway routes each request to the engine with the fewest outstanding requests.",
    "When the load rises the controller asks Slurm for another job with GPUs.",
    "Hello, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


def generate(out: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    special = ["<|begin|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin|>", eos_token="<|end|>",
                                        pad_token="<|pad|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    # vLLM reads the chat template from tokenizer_config.json; keep it explicit there too.
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(tok_cfg, indent=2))
    # Engines run as the job's user, not as whoever generated the model.
    for path in out.iterdir():
        path.chmod(0o644)
    out.chmod(0o755)
    return out


def is_complete(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "tokenizer.json").exists() and any(
        path.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the tiny Llama model used by the bed and the tests.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even when the folder is complete")
    args = parser.parse_args(argv)
    if is_complete(args.out) and not args.force:
        print(f"{args.out}: already there")
        return 0
    generate(args.out, args.seed)
    print(f"{args.out}: generated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
