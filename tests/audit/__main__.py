"""``python -m tests.audit``: see :mod:`tests.audit.audit`."""

from tests.audit.audit import main

raise SystemExit(main())
