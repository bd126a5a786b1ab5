"""``python -m rm_lightning.prepare``: convert and cache the bundled model (part of the set-up command).

Doing it at install time keeps the first training run, and every test, free of the one-off
GGUF dequantization.
"""

import time

from rm_lightning.backbones import BUNDLED_MODEL, ensure_bundled_model_cached, load_backbone


def main() -> None:
    began = time.perf_counter()
    folder = ensure_bundled_model_cached()
    load_backbone(BUNDLED_MODEL)
    print(f"[rm-lightning] {BUNDLED_MODEL} ready in {folder} ({time.perf_counter() - began:.1f} s)")


if __name__ == "__main__":
    main()
