"""`python -m tunelab ...` is the same as `tunelab ...`."""

import sys

from tunelab.cli import main

sys.exit(main())
