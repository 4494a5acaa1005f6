"""`python -m pipeline` is the `distill` command."""

import sys

from pipeline.cli import main

sys.exit(main())
