"""``python -m benchmarks``: the relay's performance figures (benchmarks.figures)."""

import sys

from benchmarks.figures import main

sys.exit(main())
