"""`python -m planbus`: the operator commands (see `python -m planbus --help`)."""

import sys

from planbus.ops.cli import main

sys.exit(main())
