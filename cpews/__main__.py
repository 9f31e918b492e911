"""`python -m cpews ...`: the same command line as the `cpews` console script."""

from orchestration.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
