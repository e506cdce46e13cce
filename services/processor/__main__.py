"""`python -m services.processor ...`: the same as `triptych serve processor ...` (flags: `--help`)."""

import sys

from services.cli import main

sys.exit(main(["serve", "processor", *sys.argv[1:]]))
