"""``python -m dafusion_aug``: the same as the ``dafusion-aug`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
