"""``python -m vblora_rs demo``: the built-in example (see :mod:`vblora_rs.demo`)."""

import sys

from .demo import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["demo"]:
        args = args[1:]
    main(args)
