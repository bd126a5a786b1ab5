"""``python -m rm_lightning.export <checkpoint or run dir> <out>``: a trained reward model as a Hugging Face folder.

EX-RM: a sequence-classification folder (``AutoModelForSequenceClassification.from_pretrained(out)``);
IM-RM: the policy's causal-LM folder plus implicit_reward.json (reference, beta); EX-GRM: the causal-LM
folder plus generative_reward.json (prompt template). The code is ``rm_lightning.models.export``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from rm_lightning.errors import exit_status


def run(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rm_lightning.export", description="Export a trained reward model as a Hugging Face folder.",
        epilog="EX-RM: a sequence-classification folder; IM-RM: the policy plus implicit_reward.json; EX-GRM: the "
               "causal LM plus generative_reward.json.")
    parser.add_argument("source", help="a .ckpt file, a run directory (its checkpoints/last.ckpt), or a runs root "
                                       "such as runs/exrm_persona (its newest run's)")
    parser.add_argument("out", help="the folder to write (created; must be new or empty unless --overwrite)")
    parser.add_argument("--push_to_hub", metavar="REPO", help="also upload the folder to this hub repository")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder")
    args = parser.parse_args(argv)
    from rm_lightning.models.export import export  # after parsing: --help stays instant

    export(args.source, args.out, push_to_hub_repo=args.push_to_hub, overwrite=args.overwrite)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The command's exit status; bad input is one ``error:`` line and status 2."""
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
