"""`python -m posttrain` is the `posttrain` command (torchrun starts each rank this way: `-m posttrain`)."""

import sys

from posttrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
