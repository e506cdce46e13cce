"""`python -m services.front ...`: the same as `triptych serve front ...` (flags: `--help`)."""

import sys

from services.cli import main

sys.exit(main(["serve", "front", *sys.argv[1:]]))
