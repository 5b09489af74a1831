"""``python -m polyak`` runs the ``polyak`` command."""

from .cli import main

raise SystemExit(main())
