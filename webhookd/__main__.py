"""`python -m webhookd`: the same command line as the `webhookd` script."""

from webhookd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
