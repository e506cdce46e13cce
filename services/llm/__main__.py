"""`python -m services.llm ...`: the same as `triptych serve llm ...` (flags: `--help`)."""

import sys

from services.cli import main

sys.exit(main(["serve", "llm", *sys.argv[1:]]))
