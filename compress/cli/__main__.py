"""`python -m compress.cli`: the flashlite command line."""

import sys

from compress.cli import main

sys.exit(main())
