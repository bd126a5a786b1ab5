"""Peak memory and step time of a real training run at several token budgets, side by side.

Runs ``cli.py fit`` once per budget under ``/usr/bin/time -v`` (UltraFeedback at the paper's caps
by default: 512/512 tokens, all 200 training pairs, batch 32, no evaluation) and prints, per
budget: the peak resident memory (``time``'s maximum RSS, and ``results.json``'s peak), the
seconds of each training step after the first (from the TensorBoard event times of
``train/loss``), seconds per pair, and the loss of every step. A benchmark, not a test.

    python benchmarks/token_budget.py --budgets 2048 8192 --steps 3 --batch 32
    python benchmarks/token_budget.py --budgets 2048 8192 --extra --model.init_args.activation_checkpointing true
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


def command(config: str, budget: str, steps: int, batch: int, caps: int, root: Path, extra: list[str]) -> list[str]:
    return ["/usr/bin/time", "-v", sys.executable, str(ROOT / "cli.py"), "fit", "--config", config,
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--data.init_args.train", '{"path": "ultrafeedback/train.jsonl", "limit": null}',
            "--data.init_args.max_prompt_tokens", str(caps), "--data.init_args.max_response_tokens", str(caps),
            "--data.init_args.batch_size", str(batch), "--model.init_args.token_budget", budget, *extra]


def measure(args, budget: str) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"token_budget_{budget}_"))
    done = subprocess.run(command(args.config, budget, args.steps, args.batch, args.caps, root, args.extra),
                          cwd=ROOT, capture_output=True, text=True)
    log = done.stdout + done.stderr
    (root / "run.log").write_text(log)
    if done.returncode != 0:
        return {"budget": budget, "failed": done.returncode, "log": str(root / "run.log")}
    rss_kib = max_rss_kib(log)
    results = json.loads(next(root.rglob("results.json")).read_text())
    times, losses = step_times_and_losses(root)
    chosen = re.search(r"token_budget auto: .*", log)
    return {"budget": budget, "max_rss_gib": round(rss_kib / 2 ** 20, 2),
            "results_peak": results.get("peak_memory"),
            "step_s": [round(t, 1) for t in times], "s_per_pair": [round(t / args.batch, 2) for t in times],
            "losses": [round(v, 5) for v in losses], "auto": chosen.group(0) if chosen else None,
            "wall_s": results.get("wall_time_s"), "log": str(root / "run.log")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/exrm_ultrafeedback.yaml")
    parser.add_argument("--budgets", nargs="+", default=["2048", "8192"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--caps", type=int, default=512)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further cli.py arguments")
    args = parser.parse_args()
    for budget in args.budgets:
        print(json.dumps(measure(args, budget)), flush=True)


if __name__ == "__main__":
    main()
