"""Entry point: `python -m services.merchant`."""

from libs import service
from services.merchant.bootstrap import build
from services.merchant.settings import Settings

if __name__ == "__main__":
    service.run("merchant", Settings, build)
