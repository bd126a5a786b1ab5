"""Seconds per autograd node type in backward, read from graph hooks instead of torch.profiler.

A CPU backward runs its nodes one after another on the calling thread, so a node's time is
the time from its start to the next node's start (the last one's, to the end of backward); it
includes the engine's work between the two. Only pre-hooks are used. Under torch.profiler,
and with hooks that run after each node (which get the node's gradients), the very operations
in question, the short memory-bound ones, ran several times slower than in plain steps: on the
persona batch the dense embedding gradient took 150-210 ms a step there against under 12 ms
here. On a GPU a node's start is only its launch, so this is for CPUs.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from typing import Callable

import torch


def graph_nodes(root) -> list:
    """Every node reachable from ``root`` (a ``grad_fn``), each once."""
    seen, stack, nodes = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return nodes


class BackwardNodeClock:
    """Wraps a loss function so that the backward of each loss it returns is timed node by node."""

    def __init__(self):
        self.starts: list[list[tuple[str, float]]] = []  # per backward: (node type, start) in run order

    def wrap(self, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def timed_loss() -> torch.Tensor:
            loss = loss_fn()
            self._hook(loss.grad_fn)
            return loss
        return timed_loss

    def _hook(self, root) -> None:
        starts: list[tuple[str, float]] = []
        self.starts.append(starts)

        def record(name: str):
            return lambda grad_outputs: starts.append((name, time.perf_counter()))

        for node in graph_nodes(root):
            node.register_prehook(record(node.name()))

    def per_node_type(self, backward_seconds: list[float]) -> list[tuple[dict[str, float], Counter]]:
        """Per backward, seconds and calls per node type; ``backward_seconds`` (each backward's wall
        clock) ends the last node."""
        steps = []
        for starts, total in zip(self.starts, backward_seconds):
            seconds, calls = defaultdict(float), Counter()
            ends = [start for _, start in starts[1:]] + [starts[0][1] + total]
            for (name, start), end in zip(starts, ends):
                seconds[name] += end - start
                calls[name] += 1
            steps.append((seconds, calls))
        return steps

    def table(self, backward_seconds: list[float], rows: int) -> str:
        """Node types by median milliseconds a step, with each one's fastest and slowest step."""
        steps = self.per_node_type(backward_seconds)
        names = set().union(*(seconds for seconds, _ in steps))
        per_step = {name: [seconds.get(name, 0.0) * 1000 for seconds, _ in steps] for name in names}
        order = sorted(names, key=lambda name: -statistics.median(per_step[name]))
        lines = [f"{'autograd node':<40} {'calls':>6} {'median ms':>10} {'min ms':>8} {'max ms':>8}"]
        for name in order[:rows]:
            times = per_step[name]
            lines.append(f"{name:<40} {steps[-1][1][name]:>6} {statistics.median(times):>10.1f} "
                         f"{min(times):>8.1f} {max(times):>8.1f}")
        wall = [seconds * 1000 for seconds in backward_seconds]
        lines.append(f"{'backward, wall clock':<40} {'':>6} {statistics.median(wall):>10.1f} {min(wall):>8.1f} "
                     f"{max(wall):>8.1f}")
        return "\n".join(lines)
