"""``python -m gateway`` is the ``daarion-gateway`` command."""

from .start import main

raise SystemExit(main())
