"""``python -m lightning_rsm``: the command line."""

from lightning_rsm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
