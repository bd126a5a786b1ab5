"""``python -m rm_lightning fit --config ...``: the same CLI as ``cli.py`` and the ``rm-lightning`` script."""

import sys

from rm_lightning.cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
