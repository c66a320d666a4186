"""`python -m vmcraft_tasks.samples`: the same as `vmcraft-samples`."""

import sys

from vmcraft_tasks.samples.cli import main

sys.exit(main())
