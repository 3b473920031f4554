"""Entry point: `python -m services.settlement`."""

from libs import service
from services.settlement.bootstrap import build
from services.settlement.settings import Settings

if __name__ == "__main__":
    service.run("settlement", Settings, build)
