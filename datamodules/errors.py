"""Errors of data sets a user can fix, and downloads that leave nothing behind when they fail.

Every problem with a data set's files raises a :class:`DatasetError` whose message is one line naming the path,
what is wrong and what to do; the CLI prints it without a traceback (exit code 2).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tarfile
import urllib.error
from collections.abc import Callable, Sequence

__all__ = ["DatasetError", "DatasetNotFoundError", "DatasetValueError", "download_failed_message",
           "guarded_download", "short_reason"]


class DatasetError(Exception):
    """A data set that cannot be used as configured (missing, empty, corrupted, or a failed download). Its
    message is one line that says what is wrong and what to do; the CLI prints it without a traceback."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset files are not where ``root`` says: missing, or failing their published checksum."""


class DatasetValueError(DatasetError, ValueError):
    """Dataset files that are there but cannot be used (empty, truncated, corrupted, in another format or
    sample rate), or that do not fit the configuration (``val_size`` as large as the data)."""


# ------------------------------------------------------------------------------------------ downloads

def short_reason(err: BaseException) -> str:
    """One short line for why a download or extraction failed."""
    if isinstance(err, urllib.error.HTTPError):
        text = f"HTTP {err.code} {err.reason}"
    elif isinstance(err, tarfile.TarError):  # tarfile lists why each compression failed: keep the first
        first = re.search(r"ReadError\('([^']*)'\)", str(err))
        text = f"not a readable archive: {first.group(1) if first else err}"
    elif isinstance(err, urllib.error.URLError):
        text = str(err.reason)
    else:
        text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def download_failed_message(name: str, url: str, reason: str, folder: str, files: str) -> str:
    """The one line for a failed download: where from, why, and the two ways out."""
    return (f"downloading {name} from {url} failed ({reason}); put the files in '{folder}' by hand ({files}), "
            "or retry with network access.")


class _NewPaths:
    """Remembers what exists of ``root`` and of the ``owned`` paths in it (glob patterns relative to
    ``root``, walked recursively), so that :meth:`remove` deletes exactly what appeared since: the files
    and folders a failed download created, never one that was there before."""

    def __init__(self, root: str, owned: Sequence[str]) -> None:
        # the topmost folder of root's path that does not exist yet: the download creates it and all below
        self.created_top: str | None = None
        path = os.path.abspath(root)
        while not os.path.lexists(path):
            self.created_top = path
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        self.patterns = [os.path.join(glob.escape(root), rel) for rel in owned]
        self.before = self._existing()

    def _existing(self) -> set[str]:
        found: set[str] = set()
        for pattern in self.patterns:
            for path in glob.glob(pattern):
                found.add(path)
                if os.path.isdir(path) and not os.path.islink(path):
                    for folder, dirs, files in os.walk(path):
                        found.update(os.path.join(folder, n) for n in dirs + files)
        return found

    def remove(self) -> None:
        if self.created_top is not None:
            _remove_path(self.created_top)
            return
        for pattern in self.patterns:
            for path in glob.glob(pattern):
                if path not in self.before:
                    _remove_path(path)
                elif os.path.isdir(path) and not os.path.islink(path):
                    for folder, dirs, files in os.walk(path):
                        for n in files:
                            if os.path.join(folder, n) not in self.before:
                                _remove_path(os.path.join(folder, n))
                        for n in list(dirs):
                            if os.path.join(folder, n) not in self.before:
                                _remove_path(os.path.join(folder, n))
                                dirs.remove(n)


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except OSError:
            pass


def guarded_download(fetch: Callable[[], None], root: str, owned: Sequence[str],
                     failure: Callable[[Exception], str]) -> None:
    """Run ``fetch`` (a download into ``root``); if it fails, remove every file and folder it created
    (``root`` itself when it did not exist, else what is new among the ``owned`` glob patterns relative to
    ``root``) and raise :class:`DatasetError` with the line ``failure(error)``.

    A :class:`DatasetError` raised by ``fetch`` (the files are all there but unreadable) passes through and
    removes nothing; ``KeyboardInterrupt`` and other ``BaseException`` clean up and propagate unchanged.
    """
    created = _NewPaths(root, owned)
    try:
        fetch()
    except DatasetError:
        raise
    except Exception as err:
        created.remove()
        raise DatasetError(failure(err)) from None
    except BaseException:
        created.remove()
        raise
