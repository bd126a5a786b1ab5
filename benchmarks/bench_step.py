"""One training step of EX-RM, IM-RM and EX-GRM, side by side with TRL and a naive step.

    python benchmarks/bench_step.py [--steps 5] [--warmup 2] [--device cpu|cuda] [--skip-trl] [--out results.json]

Measures the machine's fp32 and bf16 matmul peak, then runs every (batch, RM type,
variant, precision) in its own process (benchmarks/worker.py) and prints median step time,
pairs/s, tokens/s, peak memory, MFU and throughput ratios against TRL and the naive step,
followed by the issue's targets. See benchmarks/README.md for what is timed and counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import summary  # noqa: E402
from benchmarks.batches import BATCH_PAIRS, PERSONA_MAX_PAIRS  # noqa: E402
from benchmarks.measure import matmul_peak_gflops  # noqa: E402
from rm_lightning.models.backbones import BUNDLED_MODEL, TINY_BACKBONES  # noqa: E402
from rm_lightning.errors import exit_status  # noqa: E402
from rm_lightning.perf import precision as auto_precision  # noqa: E402

WORKER = Path(__file__).resolve().parent / "worker.py"
RM_TYPES = ("exrm", "imrm", "exgrm")
BATCHES = ("persona", "ultrafeedback")
VARIANTS = ("ours", "ours-unshared", "ours-bucketed", "ours-padded", "ours-ckpt", "ours-lean", "ours-compiled",
            "naive", "trl", "trl-ckpt", "trl-compiled")
# the -ckpt, -lean and -compiled variants are about memory and speed, which only the persona targets
# ask about; the layouts other than packed are about padding, which only the ultrafeedback batch has much of
DEFAULT_VARIANTS = {"persona": ("ours", "ours-unshared", "ours-ckpt", "ours-lean", "ours-compiled", "naive", "trl",
                                "trl-ckpt", "trl-compiled"),
                    "ultrafeedback": ("ours", "ours-unshared", "ours-bucketed", "ours-padded", "naive", "trl")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--skip-trl", action="store_true", help="leave TRL out (it is the `bench` extra)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_step.json"), help="JSON with every figure")
    parser.add_argument("--rm", nargs="+", choices=RM_TYPES, default=list(RM_TYPES))
    parser.add_argument("--batches", nargs="+", choices=BATCHES, default=list(BATCHES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="default: all on persona, all but the -ckpt, -lean and -compiled ones on ultrafeedback")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "both"), default="auto",
                        help="auto: fp32, plus bf16 where trainer.precision: auto would pick bf16-mixed "
                             "(native bf16: AVX512-BF16/AMX on a CPU, Ampere or newer on a GPU)")
    parser.add_argument("--backbone", default=BUNDLED_MODEL)
    parser.add_argument("--pairs", type=int, default=BATCH_PAIRS,
                        help=f"pairs in each batch (the issue's batches have 8; a GPU needs more to be busy; "
                             f"persona has at most {PERSONA_MAX_PAIRS})")
    parser.add_argument("--uf-width", type=int, default=192,
                        help="longest row of the padding-heavy UltraFeedback batch, in tokens")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each variant's process (default: torch's choice, one per core)")
    parser.add_argument("--host-memory", choices=("kept", "default"), default="kept",
                        help="kept: every variant's process keeps freed host memory for reuse, as cli.py does "
                             "(rm_lightning/perf/host_memory.py); default: glibc's own behaviour")
    parser.add_argument("--peak-budget", type=float, default=1.0,
                        help="seconds one matmul of the peak probe may take: its size grows until then; "
                             "smaller probes read a lower peak (MFU is then overstated)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed to one variant")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.peak_budget <= 0:
        parser.error("--steps must be >= 1, --warmup >= 0 and --peak-budget > 0")
    if not 1 <= args.pairs <= (PERSONA_MAX_PAIRS if "persona" in args.batches else 10 ** 6):
        parser.error(f"--pairs must be between 1 and {PERSONA_MAX_PAIRS} (the persona batch's prompts)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    return args


def machine_info(device: str) -> dict:
    info = {"device": device, "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    for package in ("torch", "transformers", "trl", "lightning"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def choose_precisions(mode: str, device: str) -> list[str]:
    """``auto`` shares the training CLI's rule (rm_lightning/perf/precision.py), so the benchmark times
    bf16 exactly where a run would train in it."""
    if mode == "both":
        return ["fp32", "bf16"]
    if mode == "auto":
        return ["fp32", "bf16"] if auto_precision.choose(device).precision == auto_precision.BF16 else ["fp32"]
    return [mode]


def trl_missing() -> bool:
    return importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None


def plan_runs(args, precisions: list[str]) -> list[dict]:
    runs = []
    for batch in args.batches:
        for rm in args.rm:
            for variant in args.variants or DEFAULT_VARIANTS[batch]:
                if variant.startswith("trl") and (args.skip_trl or rm not in summary.TRL_TRAINERS):
                    continue
                for precision in precisions:
                    runs.append({"batch": batch, "rm": rm, "variant": variant, "precision": precision,
                                 "pairs": args.pairs})
    return runs


def ultrafeedback_rows(backbone: str, width: int, pairs: int) -> list[int]:
    from benchmarks.batches import select_padding_heavy_rows
    from rm_lightning.models.backbones import load_backbone

    model, tokenizer = load_backbone(backbone)
    del model  # only the tokenizer is needed; the workers need the memory
    return list(select_padding_heavy_rows(tokenizer, width, pairs=pairs))


def run_worker(run: dict, args, rows: list[int], workdir: Path, label: str) -> dict:
    result_path = workdir / f"{label.replace(' ', '_')}.json"
    spec = {**run, "steps": args.steps, "warmup": args.warmup, "device": args.device, "backbone": args.backbone,
            "threads": args.threads, "host_memory": args.host_memory,
            "time_linear_layers": run["variant"] in summary.OURS_FAST,  # what the MFU target reads
            "ultrafeedback_rows": rows, "result_path": str(result_path), "label": label}
    spec_path = workdir / f"{label.replace(' ', '_')}.spec.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    try:
        completed = subprocess.run([sys.executable, str(WORKER), str(spec_path)], timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**run, "error": f"timed out after {args.timeout} s"}
    if completed.returncode < 0:
        return {**run, "error": f"worker killed by signal {-completed.returncode}"
                                f"{' (out of memory?)' if completed.returncode == -9 else ''}"}
    if completed.returncode != 0 or not result_path.is_file():
        return {**run, "error": f"worker exited with status {completed.returncode} (its message is above)"}
    return {**run, **json.loads(result_path.read_text()), "wall_s": time.perf_counter() - started}


def write_json(path: Path, payload: dict) -> None:
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".tmp{os.getpid()}")
    staging.write_text(json.dumps(payload, indent=1))
    os.replace(staging, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    print(f"rm-lightning step benchmark on {machine.get('gpu', args.device)} "
          f"({machine['torch_threads']} CPU threads), torch {machine['torch']}, "
          f"transformers {machine['transformers']}, trl {machine['trl']}; "
          f"backbone {args.backbone}, {args.pairs} pairs a batch; freed host memory "
          f"{'kept for reuse' if args.host_memory == 'kept' else 'handled by glibc defaults'} in every variant",
          flush=True)
    peaks = {p: matmul_peak_gflops(args.device, p, budget_s=args.peak_budget)["gflops"] for p in ("fp32", "bf16")}
    precisions = choose_precisions(args.precision, args.device)
    wants_trl = any(v.startswith("trl") for v in args.variants or VARIANTS)
    if wants_trl and not args.skip_trl and trl_missing():
        print("TRL is not installed, so its trainers are left out (pip install -e '.[bench]')", flush=True)
        args.skip_trl = True
    if wants_trl and not args.skip_trl and args.backbone in TINY_BACKBONES:
        print(f"TRL needs a pretrained backbone with a chat template; left out for {args.backbone}", flush=True)
        args.skip_trl = True
    print(f"matmul peak: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s -> "
          f"running {', '.join(precisions)}", flush=True)
    rows = ultrafeedback_rows(args.backbone, args.uf_width, args.pairs) if "ultrafeedback" in args.batches else []
    runs = plan_runs(args, precisions)
    finished = []
    with tempfile.TemporaryDirectory(prefix="bench-step-") as workdir:
        for index, run in enumerate(runs, start=1):
            label = f"{run['batch']} {run['rm']} {run['variant']} {run['precision']}"
            print(f"[{index}/{len(runs)}] {label}", flush=True)
            result = run_worker(run, args, rows, Path(workdir), label)
            summary.derive(result, peaks)
            if "error" not in result:
                once = (f", reference pass {result['reference_pass_s']:.1f} s (once per dataset, not in the step)"
                        if "reference_pass_s" in result else "")
                matmuls = (f", MFU {100 * result['mfu']:.0f}%; {summary.linear_layers_summary(result)}"
                           if "linear_layers_share" in result else "")
                print(f"    median {result['median_s']:.2f} s/step, peak {result['peak_mem_mb']:.0f} MB{matmuls}{once}",
                      flush=True)
            finished.append(result)
    summary.add_ratios(finished)
    goals = summary.targets(finished, peaks, args.device)
    print()
    print(summary.table(finished))
    print("\nMFU: useful model FLOP/s over the best measured matmul peak (see README); "
          "x TRL / x naive: pairs/s over the best run of that peer.\n"
          "Linear layers alone: the decoder's linear layers (forward and backward) timed by themselves at "
          "the batch's shapes, as a share of the step and in GFLOP/s.")
    print("\nTargets:")
    for goal in goals:
        print(goal.line())
    payload = {"machine": machine, "matmul_peak_gflops": peaks, "precisions": precisions,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "ultrafeedback_rows": rows, "runs": finished, "targets": [g.as_dict() for g in goals]}
    write_json(args.out, payload)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
