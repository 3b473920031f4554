"""Entry point: `python -m services.fare_gate.fares quote|validate|max-fare ...` (see cli.py)."""

import sys

from services.fare_gate.fares.cli import main

if __name__ == "__main__":
    sys.exit(main())
