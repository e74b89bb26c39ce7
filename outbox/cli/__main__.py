"""``python -m outbox.cli``: the ``outbox`` command."""

import sys

from outbox.cli.main import main

sys.exit(main())
