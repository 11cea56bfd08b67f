"""``python -m ferrumkv``: the command line (see :mod:`ferrumkv.cli`)."""

from ferrumkv.cli import main

raise SystemExit(main())
