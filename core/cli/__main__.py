"""``python -m lft.cli``: the same as the ``lft`` command."""

from lft.cli.main import main

raise SystemExit(main())
