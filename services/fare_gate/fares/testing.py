"""Tiny feeds for tests: write a few CSV files into a folder (or a zip) and load them.

Shipped beside the engine so every test tier (the fare engine's unit tests now, the tap
path's tests later) builds feeds the same way. A test starts from BASE_FILES, a valid
minimal feed, and replaces, adds or removes (value None) only the files it is about.
Indentation and a leading newline in file texts are removed, so tests can write tables
inline.
"""

from __future__ import annotations

import textwrap
import zipfile
from collections.abc import Mapping
from pathlib import Path

BASE_FILES: dict[str, str] = {
    "citytap_settings.txt": """
        feed_timezone,service_day_start
        Asia/Taipei,04:30:00
        """,
    "stops.txt": """
        stop_id,stop_name,stop_lat,stop_lon
        A,Stop A,25.0000,121.5000
        B,Stop B,25.0100,121.5000
        C,Stop C,25.0200,121.5000
        D,Stop D,25.0300,121.5000
        """,
    "routes.txt": """
        route_id,route_short_name
        M1,Metro 1
        B1,Bus 1
        """,
    "networks.txt": """
        network_id,network_name
        metro,Metro
        bus,Bus
        """,
    "route_networks.txt": """
        network_id,route_id
        metro,M1
        bus,B1
        """,
    "fare_products.txt": """
        fare_product_id,amount,currency
        flat,10.00,TWD
        """,
    "fare_leg_rules.txt": """
        fare_product_id
        flat
        """,
}


def clean(text: str) -> str:
    return textwrap.dedent(text).strip("\n") + "\n"


def write_feed(folder: Path, files: Mapping[str, str | None] | None = None, *, base: bool = True) -> Path:
    """Write BASE_FILES (unless base=False) overridden by `files` into `folder`; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    merged: dict[str, str | None] = {**(BASE_FILES if base else {}), **(files or {})}
    for name, text in merged.items():
        if text is not None:
            (folder / name).write_text(clean(text), encoding="utf-8")
    return folder


def zip_feed(folder: Path, archive: Path, *, inside: str = "") -> Path:
    """Zip every .txt file of `folder` into `archive`, at the top level or under `inside/`."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.glob("*.txt")):
            zipped.write(path, f"{inside}/{path.name}" if inside else path.name)
    return archive
