"""python -m cepe ... (see cepe.cli)."""

import sys

from .cli import main

sys.exit(main())
