"""What differs between a local disk and an object store, asked in one place.

The Beam jobs read and write every user path through Beam's `FileSystems` (local,
`gs://`, and any scheme Beam has a file system for). Two questions still depend on the
kind of path, and this module answers them by Beam's own scheme rule:
- `is_local`: a path with no scheme is on this machine's disk, where folders exist
  without files in them, links and FIFOs exist, and a file can be locked;
- `absolute`: local paths are made absolute and normalised, so one file spelled several
  ways (`../data/x.jpg`, `/abs//data/x.jpg`) is one uri; remote paths are uris already.
"""

from __future__ import annotations

import os

from apache_beam.io.filesystems import FileSystems


def is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def absolute(path: str) -> str:
    return os.path.abspath(path) if is_local(path) else path
