"""Entry point: `python -m services.fare_gate.emulator`."""

import sys

from services.fare_gate.emulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
