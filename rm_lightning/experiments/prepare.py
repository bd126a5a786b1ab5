"""``python -m rm_lightning.prepare [name ...]``: convert and cache built-in GGUF backbones (the bundled
SmolLM2 by default, part of the set-up command; ``gemma3-270m`` once its extra is installed).

Doing it at install time keeps the first training run, and every test, free of the one-off
GGUF dequantization.
"""

import argparse
import sys
import time

from rm_lightning.errors import SettingError, exit_status
from rm_lightning.models.backbones import BUNDLED_MODEL, GGUF_BACKBONES, ensure_converted, load_backbone


def run(names: list[str]) -> int:
    for name in names:
        if name not in GGUF_BACKBONES:
            raise SettingError(f"prepare: '{name}' is not a built-in GGUF backbone ({', '.join(GGUF_BACKBONES)})")
    for name in names:
        began = time.perf_counter()
        folder = ensure_converted(name)
        load_backbone(name)
        print(f"[rm-lightning] {name} ready in {folder} ({time.perf_counter() - began:.1f} s)")
    return 0


def parse_names(argv: list[str]) -> list[str]:
    """The backbone names asked for (the bundled model when none); ``--help`` prints the usage and exits."""
    parser = argparse.ArgumentParser(prog="python -m rm_lightning.prepare",
                                     description="Convert and cache built-in GGUF backbones.")
    parser.add_argument("names", nargs="*", metavar="name",
                        help=f"built-in GGUF backbones to convert ({', '.join(GGUF_BACKBONES)}; default {BUNDLED_MODEL})")
    return parser.parse_args(argv).names or [BUNDLED_MODEL]


def main(argv: list[str] | None = None) -> int:
    """The command's exit status; bad input is one ``error:`` line and status 2."""
    names = parse_names(list(sys.argv[1:] if argv is None else argv))
    return exit_status(lambda: run(names))


if __name__ == "__main__":
    sys.exit(main())
