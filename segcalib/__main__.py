"""``python -m segcalib`` is the ``segcalib`` command."""

from segcalib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
