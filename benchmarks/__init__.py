"""Step benchmark of rm-lightning against TRL and a naive step (see benchmarks/README.md)."""
