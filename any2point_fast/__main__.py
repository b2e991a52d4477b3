"""``python -m any2point_fast``: the ``any2point-fast`` command."""

import sys

from .cli import main

sys.exit(main())
