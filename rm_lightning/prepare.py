"""``python -m rm_lightning.prepare``: the command; its code is ``rm_lightning.experiments.prepare``."""

import sys

from rm_lightning.experiments.prepare import main

if __name__ == "__main__":
    sys.exit(main())
