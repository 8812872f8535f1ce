"""`python -m trio_swap` is the same as the `trio-swap` command."""

from trio_swap.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
