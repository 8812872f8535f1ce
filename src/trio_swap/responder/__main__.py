"""`python -m trio_swap.responder` is `trio-swap responder`."""

from trio_swap.responder.server import main

if __name__ == "__main__":
    raise SystemExit(main())
