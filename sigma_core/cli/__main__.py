"""``python -m sigma_core.cli``: the same as the ``entropy-collapse`` command."""
import sys

from sigma_core.cli import main

sys.exit(main())
