"""``python -m gateway`` is the ``daarion-gateway`` command."""

from .cli import main

raise SystemExit(main())
