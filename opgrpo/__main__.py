"""`python -m opgrpo ...` runs the command-line interface (the `ray job submit` entrypoint)."""

from opgrpo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
