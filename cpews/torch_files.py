"""Files written by `torch.save`, read without unpickling anything but tensors and plain containers.

`load_torch_file` is the one `torch.load` of cpews and orchestration (checkpoints, backbone weights, prototype
pools). A file that does not load is refused with one line that names it and says why: "empty", "not a PyTorch
file", "truncated", "damaged", "contains objects other than tensors". PyTorch's own multi-line text (and its advice
to load the file with `weights_only=False`, which would run code from it) stays out of the message; it goes to the
debug log (logger `cpews.torch_files`).

A zip-format file (every `torch.save` since PyTorch 1.6) is also checked against the CRC-32 of each member, which
`torch.load` does not do: flipped bytes inside a tensor would otherwise load as wrong weights.
"""

from __future__ import annotations

import logging
import re
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

__all__ = ["TorchFileError", "load_torch_file", "torch_file_problem"]

_log = logging.getLogger(__name__)

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80  # first byte of a pickle of protocol >= 2 (the legacy torch.save format)
CRC_BLOCK = 1 << 22  # bytes read at a time while checking a member's CRC-32


class TorchFileError(ValueError):
    """A file that `torch.load(weights_only=True)` cannot read; `reason` says why in a few words."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{str(path)!r}: {reason}")


def load_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` after a structural check of the file.

    Raises:
        TorchFileError: no such file, or it does not load (the reason is one short line).
    """
    path = Path(path)
    if not path.is_file():
        raise TorchFileError(path, "no such file")
    problem = torch_file_problem(path)
    if problem is not None:
        raise TorchFileError(path, problem)
    try:
        with warnings.catch_warnings():  # its note on a pickle protocol is one more multi-line text
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, OSError, EOFError, KeyError, UnpicklingError, ...
        _log.debug("loading %s (weights only) failed", path, exc_info=True)
        raise TorchFileError(path, _load_failure_reason(path, exc)) from None


def torch_file_problem(path: str | Path) -> str | None:
    """What is structurally wrong with `path` as a `torch.save` file, without unpickling it; None when nothing is.

    Checks the first bytes (a zip archive or a pickle), that a zip archive is complete, and each member's CRC-32
    (members whose recorded CRC is 0, as written with `compute_crc32=False`, are not checked).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        if head[0] == PICKLE_PROTO:
            return None  # the legacy format: only unpickling (weights only) tells
        return "not a PyTorch file (neither a zip archive nor a pickle)"
    if not zipfile.is_zipfile(path):
        return f"truncated ({size} bytes; the end of its zip archive is missing)"
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue
                if not _member_crc_ok(archive, info):
                    return f"damaged (member {info.filename!r} fails its CRC-32 check)"
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        _log.debug("zip check of %s failed", path, exc_info=True)
        return f"damaged (unreadable zip archive: {_first_line(exc)})"
    return None


def _member_crc_ok(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """Whether one member's bytes match its recorded CRC-32 (zipfile checks it once the member is read)."""
    try:
        with archive.open(info) as member:
            while member.read(CRC_BLOCK):
                pass
    except zipfile.BadZipFile as exc:
        if "CRC" in str(exc):
            return False
        raise
    return True


def _load_failure_reason(path: Path, exc: BaseException) -> str:
    """One short line for a failed weights-only `torch.load` of a structurally sound file."""
    text = str(exc)
    unsupported = re.search(r"\bGLOBAL ([\w.]+)", text)  # "Unsupported global: GLOBAL x", "unsupported GLOBAL x"
    if unsupported:
        return f"contains objects other than tensors ({unsupported.group(1)}); such files are never unpickled"
    if isinstance(exc, EOFError):
        return "truncated (the pickle ends early)"
    if not zipfile.is_zipfile(path):  # a pickle (the legacy format): unpickling it failed
        return "not a PyTorch file (a pickle that torch.save did not write, or a damaged one)"
    if "Weights only load failed" in text:
        return "contains objects other than tensors; such files are never unpickled"
    if "failed locating file" in text or "file not found" in text:
        return "not a PyTorch file (a zip archive that torch.save did not write)"
    if "PytorchStreamReader" in text or "miniz" in text:
        return "damaged (unreadable zip archive)"
    return f"unreadable ({type(exc).__name__}: {_first_line(exc)})"


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's text, at most 160 characters, never PyTorch's weights_only advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    if "weights_only" in line:
        return type(exc).__name__
    return line[:160]
