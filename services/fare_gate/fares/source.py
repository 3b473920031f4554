"""Reading a feed's files from a folder or a zip archive: the engine's only I/O.

A feed is a set of `.txt` CSV files. In a zip they sit at the top level or together in one
top-level folder (what zipping a folder produces). Reading is bounded: at most
FEED_FILES_MAX files of at most FEED_FILE_BYTES_MAX bytes each (checked against the zip's
declared sizes before anything is inflated), so a hostile archive cannot exhaust memory.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from services.fare_gate.fares.errors import Problem

FEED_FILES_MAX = 64
FEED_FILE_BYTES_MAX = 32 * 1024 * 1024


def read_feed_files(path: str | Path) -> tuple[dict[str, bytes], list[Problem]]:
    """Return {file name: bytes} for every .txt file of the feed at `path`, and any problems."""
    location = Path(path)
    label = location.name or str(location)
    if location.is_dir():
        return _read_folder(location, label)
    if location.is_file() and zipfile.is_zipfile(location):
        return _read_zip(location, label)
    if location.exists():
        return {}, [Problem(label, None, None, "is neither a folder nor a zip archive of a feed")]
    return {}, [Problem(label, None, None, "no such folder or zip archive")]


def _read_folder(folder: Path, label: str) -> tuple[dict[str, bytes], list[Problem]]:
    files: dict[str, bytes] = {}
    problems: list[Problem] = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_file() or entry.suffix != ".txt":
            continue
        if len(files) >= FEED_FILES_MAX:
            problems.append(Problem(label, None, None, f"has more than {FEED_FILES_MAX} .txt files"))
            break
        size = entry.stat().st_size
        if size > FEED_FILE_BYTES_MAX:
            problems.append(Problem(entry.name, None, None, f"is {size} bytes, more than the {FEED_FILE_BYTES_MAX} allowed"))
            continue
        files[entry.name] = entry.read_bytes()
    return files, problems


def _read_zip(archive: Path, label: str) -> tuple[dict[str, bytes], list[Problem]]:
    files: dict[str, bytes] = {}
    problems: list[Problem] = []
    with zipfile.ZipFile(archive) as zipped:
        members = [info for info in zipped.infolist() if not info.is_dir() and info.filename.endswith(".txt")]
        members = [info for info in members if not PurePosixPath(info.filename).name.startswith(".")]
        folders = {PurePosixPath(info.filename).parent for info in members}
        if len(folders) > 1:
            top = [info for info in members if PurePosixPath(info.filename).parent == PurePosixPath(".")]
            if top:
                members = top
            else:
                problems.append(Problem(label, None, None, "holds .txt files in several folders; put the feed at the top level or in one folder"))
                return files, problems
        for info in sorted(members, key=lambda item: item.filename):
            name = PurePosixPath(info.filename).name
            if len(files) >= FEED_FILES_MAX:
                problems.append(Problem(label, None, None, f"has more than {FEED_FILES_MAX} .txt files"))
                break
            if info.file_size > FEED_FILE_BYTES_MAX:
                problems.append(Problem(name, None, None, f"is {info.file_size} bytes, more than the {FEED_FILE_BYTES_MAX} allowed"))
                continue
            with zipped.open(info) as handle:
                data = handle.read(FEED_FILE_BYTES_MAX + 1)
            if len(data) > FEED_FILE_BYTES_MAX:
                problems.append(Problem(name, None, None, f"inflates past the {FEED_FILE_BYTES_MAX} bytes allowed"))
                continue
            files[name] = data
    return files, problems
