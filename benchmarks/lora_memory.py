"""Peak memory of a few training steps with and without LoRA, per RM type, side by side.

Runs ``cli.py fit`` of each Persona config (the bundled SmolLM2-135M-Instruct, fp32, no evaluation,
no checkpoint) under ``/usr/bin/time -v``, once with full fine-tuning and once with
``model.init_args.lora``, and prints per run: ``time``'s maximum resident set size, the trainable
parameters, the seconds of each step after the first (TensorBoard event times of ``train/loss``)
and the loss of every step. An IM-RM's reference log-probs come from the cache when an earlier run
computed them (a LoRA run shares the full fine-tuning run's cache entry); a cold cache adds the
reference pass, which runs without gradients and stays below the training steps' peak. A benchmark,
not a test.

    python benchmarks/lora_memory.py --configs configs/imrm_persona.yaml configs/exrm_persona.yaml --steps 3
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timed_fit import max_rss_kib, step_times_and_losses  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def command(config: str, lora: str | None, steps: int, root: Path, extra: list[str]) -> list[str]:
    options = ["--model.init_args.lora", lora] if lora else []
    return ["/usr/bin/time", "-v", sys.executable, str(ROOT / "cli.py"), "fit", "--config", config,
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_checkpointing", "false", *options, *extra]


def measure(config: str, lora: str | None, args) -> dict:
    name = f"{Path(config).stem}_{'lora' if lora else 'full'}"
    root = Path(tempfile.mkdtemp(prefix=f"lora_memory_{name}_"))
    done = subprocess.run(command(config, lora, args.steps, root, args.extra), cwd=ROOT, capture_output=True,
                          text=True)
    log = done.stdout + done.stderr
    (root / "run.log").write_text(log)
    if done.returncode != 0:
        return {"run": name, "failed": done.returncode, "log": str(root / "run.log")}
    rss_kib = max_rss_kib(log)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", log)
    trainable = re.search(r"Trainable params: (\S+ ?\S*)", log)
    times, losses = step_times_and_losses(root)
    return {"run": name, "max_rss_gib": round(rss_kib / 2 ** 20, 2),
            "trainable": trainable.group(1).strip() if trainable else None,
            "step_s": [round(t, 1) for t in times], "losses": [round(v, 5) for v in losses],
            "wall": wall.group(1) if wall else None, "log": str(root / "run.log")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["configs/imrm_persona.yaml", "configs/exrm_persona.yaml"])
    parser.add_argument("--lora", default='{"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}')
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further cli.py arguments")
    args = parser.parse_args()
    for config in args.configs:
        for lora in [args.lora if variant == "lora" else None for variant in args.variants]:
            print(json.dumps(measure(config, lora, args)), flush=True)


if __name__ == "__main__":
    main()
