"""Where one training step of the benchmark spends its time: torch.profiler's operator table.

    python benchmarks/profile_step.py --rm imrm --device cuda --backbone /tmp/llama-1b --pairs 128 \\
        [--variant ours] [--precision bf16] [--trace runs/step_trace.json]

Builds exactly the step ``bench_step.py`` times (same batch, module, optimizer), runs it
``--warmup`` times, then profiles ``--steps`` calls and prints the operators that took longest
(on a GPU by device time, with the device's busy share of the wall clock, which shows how much
of the step is the host keeping the GPU waiting). ``--trace`` also writes a Chrome trace
(open it in chrome://tracing or Perfetto). ``--backward-nodes`` (CPU) instead times each
autograd node of the backward with graph pre-hooks, without the profiler, which on a CPU slows
the short memory-bound operations it would measure (``benchmarks/backward_nodes.py``); it
prints each node type's fastest and slowest step too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import worker  # noqa: E402  (sets the quiet logging the benchmark uses)
from benchmarks.backward_nodes import BackwardNodeClock  # noqa: E402
from benchmarks.batches import BATCH_PAIRS  # noqa: E402
from benchmarks.bench_step import RM_TYPES, VARIANTS  # noqa: E402
from benchmarks.measure import synchronize  # noqa: E402
from rm_lightning.models.backbones import BUNDLED_MODEL  # noqa: E402
from rm_lightning.errors import exit_status  # noqa: E402
from rm_lightning.perf.process_tuning import tune_process  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rm", choices=RM_TYPES, default="exrm")
    parser.add_argument("--variant", choices=[v for v in VARIANTS if not v.startswith("trl")], default="ours")
    parser.add_argument("--batch", choices=("persona",), default="persona")
    parser.add_argument("--pairs", type=int, default=BATCH_PAIRS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--backbone", default=BUNDLED_MODEL)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    parser.add_argument("--trace", type=Path, default=None, help="write a Chrome trace here")
    parser.add_argument("--backward-nodes", action="store_true",
                        help="time backward's autograd nodes with graph hooks instead of profiling (CPU only)")
    args = parser.parse_args(argv)
    if args.backward_nodes and (args.device != "cpu" or args.trace is not None):
        parser.error("--backward-nodes times a CPU backward and writes no trace: drop --device cuda and --trace")
    return args


def device_busy_seconds(events) -> float:
    """Summed duration of the GPU's own events, its kernels and copies: what the GPU was busy with."""
    on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in on_gpu) / 1e6


def main(argv=None) -> int:
    args = parse_args(argv)
    tune_process()  # as the benchmark and cli.py run
    spec = {"rm": args.rm, "variant": args.variant, "batch": args.batch, "pairs": args.pairs, "device": args.device,
            "precision": args.precision, "backbone": args.backbone}
    step, stats = worker.build_module_step(spec)
    for _ in range(args.warmup):
        step()
    if args.backward_nodes:
        return print_backward_nodes(step, args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    synchronize(args.device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        synchronize(args.device)
    wall = (time.perf_counter() - start) / args.steps
    print(f"{args.rm} {args.variant} {args.precision} on {args.device}, {args.pairs} pairs, {stats['tokens']} tokens: "
          f"{wall * 1000:.1f} ms a step under the profiler")
    if args.device == "cuda":
        busy = device_busy_seconds(prof.events()) / args.steps
        print(f"GPU busy {busy * 1000:.1f} ms a step ({100 * busy / wall:.0f}% of the wall clock)")
    sort = "device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    if args.trace is not None:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.trace))
        print(f"wrote {args.trace}")
    return 0


def print_backward_nodes(step, args) -> int:
    clock = BackwardNodeClock()
    step.loss_fn = clock.wrap(step.loss_fn)
    for _ in range(args.steps):
        step()
    backward = [phases["backward"] for phases in step.phases[-args.steps:]]
    print(f"{args.rm} {args.variant} {args.precision} on cpu, {args.pairs} pairs: backward by autograd node "
          f"over {args.steps} steps")
    print(clock.table(backward, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
