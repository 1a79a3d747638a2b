"""``torchrun --nproc_per_node=N -m pipeprop.distributed [options]`` (see ``--help``)."""

import sys

from .worker import main

if __name__ == "__main__":
    sys.exit(main())
