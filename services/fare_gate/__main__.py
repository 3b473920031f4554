"""Entry point: `python -m services.fare_gate`."""

from libs import service
from services.fare_gate.bootstrap import build
from services.fare_gate.settings import Settings

if __name__ == "__main__":
    service.run("fare_gate", Settings, build)
