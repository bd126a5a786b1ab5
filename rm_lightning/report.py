"""``python -m rm_lightning.report``: the command; its code is ``rm_lightning.experiments.report``."""

import sys

from rm_lightning.experiments.report import main

if __name__ == "__main__":
    sys.exit(main())
