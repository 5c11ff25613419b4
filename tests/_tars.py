"""Writing raw tar shards in tests (hostile member names and contents included)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_tar(path: Path, files: list[tuple[str, bytes]]) -> str:
    """A tar at ``path`` holding ``files`` (name, bytes) in order, exactly as given; its path."""
    with tarfile.open(path, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)
