"""`python -m carina` runs the CLI."""

from carina.cli import main

raise SystemExit(main())
