import sys

from fxfuse.cli import main

sys.exit(main())
