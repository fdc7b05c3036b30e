"""`python -m planbus`: the operator commands (status, retry, request, demo)."""

import sys

from planbus.cli import main

sys.exit(main())
