"""Tiny models and planted RL-like trajectories, for the documentation's examples and tests.

    python -m relex_merge.testing.synthetic runs/synthetic

writes ``runs/synthetic/base`` and ``runs/synthetic/checkpoint-{1..8}``: a tiny Qwen2 model
with a character-level tokenizer whose every tensor moves along one random direction with a
coefficient linear in the step, plus a little noise; and ``runs/synthetic/domain-finetune``,
another fine-tune of the same base for multi-stage examples. Offline, in seconds.
"""

from __future__ import annotations

import argparse
import json
import string
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "CHARS",
    "SPECIAL_TOKENS",
    "char_tokenizer",
    "tiny_config",
    "make_tiny_model",
    "planted_state",
    "make_planted_run",
    "make_finetune",
    "main",
]

CHARS = string.digits + string.ascii_letters + " +-=*/.,:;?!()'\"\n"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def char_tokenizer():
    """A character-level fast tokenizer (no files from the hub)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def tiny_config(arch: str = "qwen2", tied: bool = False, hidden: int = 32, layers: int = 2):
    """A transformers config for a tiny Qwen2 or Llama over the character vocabulary."""
    from transformers import LlamaConfig, Qwen2Config

    vocab = len(SPECIAL_TOKENS) + len(CHARS)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"unknown tiny architecture {arch!r} (qwen2 or llama)")


def make_tiny_model(folder: Path, arch: str = "qwen2", tied: bool = False, seed: int = 0, **kw):
    """Save a randomly initialised tiny model and the char tokenizer to ``folder``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tied, **kw))
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per tiny checkpoint
    try:
        model.save_pretrained(folder)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    char_tokenizer().save_pretrained(folder)
    return model


def planted_state(
    base: dict[str, torch.Tensor],
    step: float,
    directions: dict[str, torch.Tensor],
    noise: float,
    generator: torch.Generator,
    curve=lambda s: s,
) -> dict[str, torch.Tensor]:
    """theta(step) = theta0 + curve(step) * v + noise, per tensor."""
    out = {}
    for name, tensor in base.items():
        jitter = noise * torch.randn(tensor.shape, generator=generator)
        out[name] = (tensor.float() + curve(step) * directions[name] + jitter).to(tensor.dtype)
    return out


def make_planted_run(
    run_dir: Path,
    steps: Sequence[int] = tuple(range(1, 9)),
    arch: str = "qwen2",
    tied: bool = False,
    rate: float = 2e-3,
    noise: float = 1e-4,
    seed: int = 0,
    curve=lambda s: s,
    model_kwargs: dict | None = None,
) -> Path:
    """Write ``run_dir/base`` and ``run_dir/checkpoint-N`` for each step (HF Trainer layout).

    ``model_kwargs`` (hidden, layers) sizes the tiny model; ``curve`` maps step to coefficient.
    """
    from safetensors.torch import load_file, save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    base_dir = run_dir / "base"
    make_tiny_model(base_dir, arch=arch, tied=tied, seed=seed, **(model_kwargs or {}))
    base = load_file(base_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(seed + 1)
    directions = {}
    for name, tensor in base.items():
        v = torch.randn(tensor.shape, generator=gen)
        directions[name] = rate * v / v.norm() * tensor.numel() ** 0.5
    for step in steps:
        folder = run_dir / f"checkpoint-{step}"
        folder.mkdir(exist_ok=True)
        state = planted_state(base, float(step), directions, noise, gen, curve)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        for name in ("config.json", "generation_config.json"):
            if (base_dir / name).is_file():
                (folder / name).write_text((base_dir / name).read_text())
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return run_dir


def make_finetune(base_dir: Path, folder: Path, magnitude: float = 2e-3, seed: int = 100) -> Path:
    """Another fine-tune of the same base (a random small task vector), for multi-stage merges."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base_dir, folder, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {
        name: (t.float() + magnitude * torch.randn(t.shape, generator=gen)).to(t.dtype)
        for name, t in load_file(base_dir / "model.safetensors").items()
    }
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m relex_merge.testing.synthetic RUN_DIR``: write a planted run and a fine-tune."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=8, help="checkpoints 1..N (default 8)")
    parser.add_argument("--arch", choices=("qwen2", "llama"), default="qwen2")
    parser.add_argument("--tied", action="store_true", help="tie input and output embeddings")
    args = parser.parse_args(argv)
    make_planted_run(args.run_dir, steps=range(1, args.steps + 1), arch=args.arch, tied=args.tied)
    make_finetune(args.run_dir / "base", args.run_dir / "domain-finetune")
    print(f"wrote {args.run_dir}/base, checkpoint-1..{args.steps} and domain-finetune")


if __name__ == "__main__":
    main()
