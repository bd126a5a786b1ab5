"""Write a backbone folder with random weights, in the shape of a real model, for timing runs.

    python benchmarks/random_backbone.py --shape llama-1b --out /tmp/llama-1b
    python benchmarks/bench_step.py --device cuda --backbone /tmp/llama-1b --pairs 128 --skip-trl

Step time, memory and MFU depend on a model's shapes, not on its weights, so a benchmark can
run on machines that cannot download (or convert) the weights of the model it is about: a GPU
box without internet, or a model size nobody ships offline. The folder holds the tokenizer
(with its chat template) of ``--tokenizer`` (default: the bundled SmolLM2-135M-Instruct), its
config changed to the shape, and seeded random weights; ``load_backbone`` and TRL load it like
any local model. Losses and accuracies from it mean nothing: use it for timing only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rm_lightning.models.backbones import ensure_bundled_model_cached  # noqa: E402
from rm_lightning.errors import BackboneError  # noqa: E402

# config fields changed from the tokenizer folder's own config ("as-is" keeps it: SmolLM2-135M by default)
SHAPES = {
    "as-is": {},
    # Llama-3.2-1B's decoder (2048 wide, 16 layers, 8192 MLP, 32 query and 8 key/value heads, tied embeddings);
    # with SmolLM2's 49152-token vocabulary that is 1.07B parameters (Llama-3.2-1B's 128k vocabulary makes 1.24B)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
}


def write_random_backbone(out: Path, shape: str = "as-is", tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """Write the folder (under a temporary name, then renamed, so a crash leaves nothing half-written)."""
    if shape not in SHAPES:
        raise BackboneError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    source = Path(tokenizer_dir) if tokenizer_dir is not None else ensure_bundled_model_cached()
    if not (source / "config.json").is_file():
        raise BackboneError(f"{source} has no config.json: --tokenizer needs a model folder (config and tokenizer)")
    config = AutoConfig.from_pretrained(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise BackboneError(f"{source}: no usable tokenizer files ({type(err).__name__})") from None
    for field, value in SHAPES[shape].items():
        setattr(config, field, value)
    config.name_or_path = f"random-{shape}"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # half the bytes to write
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="as-is")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="model folder whose tokenizer and config to start from (default: the bundled model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = write_random_backbone(args.out, args.shape, args.tokenizer, args.seed)
    except BackboneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, random weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
