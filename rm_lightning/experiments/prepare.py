"""``python -m rm_lightning.prepare``: convert and cache the bundled model (part of the set-up command).

Doing it at install time keeps the first training run, and every test, free of the one-off
GGUF dequantization.
"""

import sys
import time

from rm_lightning.errors import exit_status
from rm_lightning.models.backbones import BUNDLED_MODEL, ensure_bundled_model_cached, load_backbone


def run() -> int:
    began = time.perf_counter()
    folder = ensure_bundled_model_cached()
    load_backbone(BUNDLED_MODEL)
    print(f"[rm-lightning] {BUNDLED_MODEL} ready in {folder} ({time.perf_counter() - began:.1f} s)")
    return 0


def main() -> int:
    """The command's exit status; bad input is one ``error:`` line and status 2."""
    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
