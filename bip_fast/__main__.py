"""``python -m bip_fast``: see :mod:`bip_fast.cli`."""
import sys

if __name__ == "__main__":
    try:  # importing torch takes a while: a Ctrl-C there is one line too, not a traceback
        from .cli import main
    except KeyboardInterrupt:
        print("bip_fast: interrupted (nothing was written)", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
