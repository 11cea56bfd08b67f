"""Runs ferrumkv's benchmark suite (same as `python -m ferrumkv bench`)."""

import sys

from ferrumkv.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
