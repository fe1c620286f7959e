"""``python -m sparse_cache ...``: the same as the ``sparse-cache`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
