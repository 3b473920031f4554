"""Entry point: `python -m services.face`."""

from libs import service
from services.face.bootstrap import build
from services.face.settings import Settings

if __name__ == "__main__":
    service.run("face", Settings, build)
