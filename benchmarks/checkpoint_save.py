"""How long a run's checkpoint save takes, and how much memory it adds: Lightning's ``TorchCheckpointIO``
(``torch.save`` into an in-memory buffer, then a write of a copy of it) against ``LocalCheckpointIO``
(``torch.save`` straight into a staged file, ``rm_lightning/perf/checkpoint_io.py``).

The checkpoint is what a fit of the bundled model saves: its weights and AdamW's two moments (fp32),
1.6 GB. Each writer runs in a fresh process (one process's peak resident memory is not reset), which
builds the checkpoint, saves it ``--repeats`` times and reports the median time and the highest resident
memory during a save beside what the process held just before it. Nothing here asserts a speed.

    python benchmarks/checkpoint_save.py                     # both writers, into runs/checkpoint_save/
    python benchmarks/checkpoint_save.py --backbone tiny-llama-chat --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRITERS = ("lightning", "local")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class ResidentPeak:
    """The highest resident memory seen while it runs, sampled every ``interval`` seconds by a thread
    (the process's own peak, ``ru_maxrss``, may come from loading the model, before any save)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._running = interval, 0, False

    def __enter__(self) -> "ResidentPeak":
        import threading

        self.peak, self._running = resident_bytes(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def fit_checkpoint(backbone: str) -> dict:
    """Weights plus AdamW state after one step, laid out as Lightning's checkpoint holds them."""
    import torch

    from rm_lightning.models.backbones import load_backbone

    model, _ = load_backbone(backbone)
    model.float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": 1}


def measure(writer: str, backbone: str, folder: Path, repeats: int) -> dict:
    """Build the checkpoint, then save it ``repeats`` times with ``writer`` (this process only)."""
    from lightning.fabric.plugins import TorchCheckpointIO

    from rm_lightning.perf.checkpoint_io import LocalCheckpointIO

    checkpoint = fit_checkpoint(backbone)
    io = {"lightning": TorchCheckpointIO, "local": LocalCheckpointIO}[writer]()
    path = folder / writer / "last.ckpt"
    before = resident_bytes()
    seconds, peaks = [], []
    for _ in range(repeats):
        with ResidentPeak() as peak:
            start = time.perf_counter()
            io.save_checkpoint(checkpoint, path)
            seconds.append(time.perf_counter() - start)
        peaks.append(peak.peak)
    return {"writer": writer, "file_bytes": path.stat().st_size, "median_s": statistics.median(seconds),
            "seconds": seconds, "resident_before_save_bytes": before, "peak_during_save_bytes": max(peaks),
            "added_by_save_bytes": max(peaks) - before, "process_peak_bytes": peak_resident_bytes()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--writers", nargs="+", choices=WRITERS, default=list(WRITERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="where the files go (default: a temporary one "
                                                                   "under runs/, removed afterwards)")
    parser.add_argument("--one", choices=WRITERS, help=argparse.SUPPRESS)  # the child process's writer
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.backbone, args.folder, args.repeats)))
        return 0
    Path("runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="checkpoint_save-", dir=args.folder or "runs") as folder:
        for writer in args.writers:
            child = subprocess.run([sys.executable, __file__, "--one", writer, "--backbone", args.backbone,
                                    "--repeats", str(args.repeats), "--folder", folder],
                                   capture_output=True, text=True, check=True)
            record = json.loads(child.stdout.strip().splitlines()[-1])
            gib = 2 ** 30
            print(f"{writer:10s} file {record['file_bytes'] / gib:.2f} GiB  save median {record['median_s']:.1f} s "
                  f"(each: {', '.join(f'{s:.1f}' for s in record['seconds'])})  RSS before the save "
                  f"{record['resident_before_save_bytes'] / gib:.2f} GiB, during it up to "
                  f"{record['peak_during_save_bytes'] / gib:.2f} GiB (+{record['added_by_save_bytes'] / gib:.2f})",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
