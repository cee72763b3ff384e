"""``python -m bip_fast``: see :mod:`bip_fast.cli`."""
import signal
import sys

if __name__ == "__main__":
    # Ctrl-C works from the first instant, also where SIGINT was inherited ignored (a background
    # job of a script); cli.main() then takes SIGINT over for the command itself.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # importing torch takes a while: a Ctrl-C there is one line too, not a traceback
        from .cli import main

        status = main()
    except KeyboardInterrupt:  # before main() took SIGINT over
        print("bip_fast: interrupted (nothing was written)", file=sys.stderr)
        status = 130
    sys.exit(status)
