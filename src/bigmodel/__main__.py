"""``python -m bigmodel``: the command line."""

from .cli import main

raise SystemExit(main())
