"""``python -m eqprop ...`` is the ``eqprop`` command line (see ``eqprop --help``)."""

from eqprop.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
