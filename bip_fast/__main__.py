"""``python -m bip_fast``: see :mod:`bip_fast.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
