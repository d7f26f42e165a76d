"""``python -m fastsde``: the command line (also ``torchrun --nproc-per-node K -m fastsde -- sample ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
