"""``python -m xflow_dist.tools.simulator``: serve the simulated provider in the foreground."""

import sys

from ._server import main

sys.exit(main())
