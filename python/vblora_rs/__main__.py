"""``python -m vblora_rs COMMAND``: the same as the ``vblora`` console script."""

import sys

try:
    from .cli import console_main
except KeyboardInterrupt:  # Ctrl-C while the command is still being imported: one line, as everywhere else
    print("vblora: interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    console_main()
