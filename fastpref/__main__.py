"""``python -m fastpref ...``: the same as the ``fastpref`` command (:func:`fastpref.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
