"""``python -m benchmarks record NAME -- ARGS`` and ``python -m benchmarks page``."""

import sys

from benchmarks.record import main

sys.exit(main())
