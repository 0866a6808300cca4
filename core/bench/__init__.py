"""The side-by-side benchmark harness: ``python -m lft.bench --help``."""
