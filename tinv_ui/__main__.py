"""`python -m tinv_ui ...`: the command line (see `tinv_ui/cli.py`)."""

from .cli import main

raise SystemExit(main())
