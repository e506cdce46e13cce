"""`python -m services.encoder ...`: the same as `triptych serve encoder ...` (flags: `--help`)."""

import sys

from services.cli import main

sys.exit(main(["serve", "encoder", *sys.argv[1:]]))
