"""Entry point: `python -m services.wallet`."""

from libs import service
from services.wallet.bootstrap import build
from services.wallet.settings import Settings

if __name__ == "__main__":
    service.run("wallet", Settings, build)
