"""``type = "file"``: backends listed in a TOML or JSON file (Traefik's file
provider).

The file holds ``backends = [...]`` in the form of a pool's ``backends``
(URL strings or ``{url, weight, backup}`` tables); other keys are ignored.
It is read again when its inode, size or modification time changes (looked
at every ``interval`` seconds) and applied only whole: a file that does not
parse, half-written or not, is an error and the pool keeps the last good
set until the file parses. Writing a new file and renaming it into place is
the way to change it in one step.

A relative ``path`` in a TOML configuration file is relative to that file
(as ``[serve] certfile`` is); in a dict configuration, to the working
directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from pathlib import Path
from typing import Any

from .._exceptions import DiscoveryError

#: Seconds between looks at the file, unless the table sets ``interval``.
DEFAULT_INTERVAL = 2.0
FORMATS = (".toml", ".json")


class FileDiscovery:
    """The backends a TOML or JSON file lists, read when it changes."""

    name = "file"

    def __init__(self, *, path: str, interval: float = DEFAULT_INTERVAL) -> None:
        if not isinstance(path, str):
            raise TypeError(f"path: must be a string, got {path!r}")
        if not path.strip():
            raise ValueError("path: must name a file, got ''")
        if Path(path).suffix.lower() not in FORMATS:
            raise ValueError(f"path: must end in .toml or .json (its format), got {path!r}")
        self.path = Path(path)
        self.interval = interval
        #: How log lines name this discovery.
        self.target = str(self.path)
        self._seen: tuple[int, int, int] | None = None
        self._backends: list[Any] = []
        self._error: str | None = None

    async def resolve(self) -> list[Any]:
        """The file's ``backends``; :class:`DiscoveryError` while it cannot
        be read or does not parse."""
        return await asyncio.to_thread(self._read)

    def _read(self) -> list[Any]:
        try:
            with self.path.open("rb") as f:
                # The identity of the file that is open: a rename into place
                # between a stat and the read cannot mix two files up.
                info = os.fstat(f.fileno())
                seen = (info.st_ino, info.st_size, info.st_mtime_ns)
                if seen == self._seen:
                    return self._unchanged()
                data = f.read()
        except OSError as exc:
            self._seen = None  # read it again as soon as it is back
            raise DiscoveryError(f"{self.path}: cannot be read: {exc.strerror}") from None
        self._seen = seen
        try:
            self._backends = _parse(data, self.path.suffix.lower())
        except ValueError as exc:
            self._error = f"{self.path}: {exc}"
            raise DiscoveryError(self._error) from None
        self._error = None
        return list(self._backends)

    def _unchanged(self) -> list[Any]:
        if self._error is not None:
            raise DiscoveryError(self._error)
        return list(self._backends)


def _parse(data: bytes, suffix: str) -> list[Any]:
    """The ``backends`` list of a file's bytes; ValueError saying what is
    wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text: {exc}") from None
    document: Any
    if suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON (incomplete?): {exc}") from None
    else:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"not valid TOML (incomplete?): {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("backends"), list):
        raise ValueError("must hold a list 'backends = [...]'")
    return list(document["backends"])
