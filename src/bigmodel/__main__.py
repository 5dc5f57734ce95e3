"""``python -m bigmodel``: the command line."""

from bigmodel.cli import main

raise SystemExit(main())
