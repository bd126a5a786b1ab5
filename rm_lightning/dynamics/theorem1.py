"""Theorem 1, checked exactly: an IM-RM can verify with margin delta while its policy barely generates.

    python -m rm_lightning.dynamics.theorem1 [--vertices 6] [--beta 0.01] [--delta 0.01] [--seed 0]

On a small Hamiltonian-cycle instance every response (every order of the N vertices) can be
enumerated. Take any reference distribution pi_ref over them and the policy

    pi(y) = pi_ref(y) * exp((delta / beta) * 1[y is a correct cycle]) / Z.

Its implicit reward beta * log(pi / pi_ref) is delta - beta log Z on correct responses and
-beta log Z on the others, so every correct response beats every incorrect one by exactly delta:
the IM-RM verifies perfectly. Yet the probability of generating a correct response is
e^{delta/beta} P_ref(C) / (1 + (e^{delta/beta} - 1) P_ref(C)) <= e^{delta/beta} P_ref(C): when the
reference rarely produces a cycle, so does the policy.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
from typing import Optional

import numpy as np

from data_modules.hamiltonian import generate_instance, is_cycle_of
from rm_lightning.errors import RMLightningError, exit_status


def theorem1_check(vertices: int = 6, edge_prob: float = 0.2, beta: float = 0.01, delta: float = 0.01,
                   seed: int = 0) -> dict:
    """Enumerate every vertex order of one seeded graph and compare the IM-RM margin with generation odds."""
    if not 4 <= vertices <= 8:
        raise RMLightningError(f"--vertices must be between 4 and 8 (every one of N! orders is enumerated), "
                               f"got {vertices}")
    if beta <= 0 or delta <= 0:
        raise RMLightningError(f"--beta and --delta must be positive, got {beta} and {delta}")
    instance = generate_instance(vertices, edge_prob, random.Random(seed))
    edges = set(instance.edges)
    correct = np.array([is_cycle_of(list(order), vertices, edges) for order in itertools.permutations(range(vertices))])
    logits = np.random.default_rng(seed).normal(size=correct.size)  # any reference distribution will do
    log_ref = logits - np.logaddexp.reduce(logits)
    log_unnormalized = log_ref + (delta / beta) * correct
    log_policy = log_unnormalized - np.logaddexp.reduce(log_unnormalized)
    rewards = beta * (log_policy - log_ref)
    margins = rewards[correct][:, None] - rewards[~correct][None, :]
    p_ref, p_policy = math.exp(np.logaddexp.reduce(log_ref[correct])), math.exp(np.logaddexp.reduce(log_policy[correct]))
    log_bound = delta / beta + math.log(p_ref)  # e^(delta/beta) alone overflows a float past delta/beta ~ 709
    return {"vertices": vertices, "orders": int(correct.size), "correct_orders": int(correct.sum()), "beta": beta,
            "delta": delta, "min_margin": float(margins.min()), "max_margin": float(margins.max()),
            "p_ref_correct": p_ref, "p_policy_correct": p_policy,
            "bound": math.exp(log_bound) if log_bound < 700 else math.inf}


def summary(result: dict) -> str:
    return (f"Theorem 1 on a {result['vertices']}-vertex graph ({result['orders']} vertex orders, "
            f"{result['correct_orders']} correct cycles), beta {result['beta']:g}, delta {result['delta']:g}: "
            f"every correct response beats every incorrect one by {result['min_margin']:.6g}"
            f"..{result['max_margin']:.6g}, while the policy generates a correct cycle with probability "
            f"{result['p_policy_correct']:.4g} <= e^(delta/beta) * {result['p_ref_correct']:.4g} (the reference's) "
            f"= {result['bound']:.4g}")


def run(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rm_lightning.dynamics.theorem1",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--vertices", type=int, default=6)
    parser.add_argument("--edge-prob", type=float, default=0.2)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--delta", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(summary(theorem1_check(args.vertices, args.edge_prob, args.beta, args.delta, args.seed)))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
