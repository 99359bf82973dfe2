"""``python -m fastdf.prover``: see :mod:`fastdf.prover.cli`."""

import sys

from .cli import main

sys.exit(main())
