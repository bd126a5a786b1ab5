"""rm-lightning command line: ``python cli.py fit --config configs/imrm_persona.yaml``.

The CLI itself lives in the package (``rm_lightning.cli``); this script, ``python -m rm_lightning``
and the ``rm-lightning`` console script all run it.
"""

from rm_lightning.cli import main

if __name__ == "__main__":
    main()
