"""Experiment tooling around single runs: grids of runs (sweep), their comparison (report), set-up (prepare)."""
