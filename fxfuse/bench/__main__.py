"""`python -m fxfuse.bench ...` runs `fxfuse bench ...`."""

import sys

from fxfuse.bench.cli import main

sys.exit(main(sys.argv[1:]))
