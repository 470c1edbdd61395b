"""``python -m vblora_rs COMMAND``: the same as the ``vblora`` console script."""

from .cli import console_main

if __name__ == "__main__":
    console_main()
