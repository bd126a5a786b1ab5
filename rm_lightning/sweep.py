"""``python -m rm_lightning.sweep``: the command; its code is ``rm_lightning.experiments.sweep``."""

import sys

from rm_lightning.experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
