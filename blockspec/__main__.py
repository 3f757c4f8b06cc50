"""`python -m blockspec ...` runs the command line (torchrun can launch it with `-m blockspec`)."""

import sys

from blockspec.cli import main

sys.exit(main())
