"""`load_torch_file`: the one `torch.load` of cpews. Real files cut short, overwritten or holding objects are
refused with one line naming the file and the reason, never with PyTorch's weights_only text."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from cpews.torch_files import TorchFileError, load_torch_file


class Payload:
    """Unpickling this would create the folder `marker`: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32), "b": torch.zeros(3)}, path)
    return path


def _refusal(path: Path) -> str:
    with pytest.raises(TorchFileError) as info:
        load_torch_file(path)
    message = str(info.value)
    assert message.startswith(repr(str(path)) + ": "), message  # the file, first
    assert "\n" not in message and "weights_only" not in message and "trust" not in message, message
    assert info.value.path == path
    return info.value.reason


def test_a_whole_file_loads(saved: Path) -> None:
    loaded = load_torch_file(saved)
    assert torch.equal(loaded["w"], torch.arange(4096, dtype=torch.float32))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    assert _refusal(tmp_path / "missing.pt") == "no such file"
    (tmp_path / "empty.pt").write_bytes(b"")
    assert _refusal(tmp_path / "empty.pt") == "empty file (0 bytes)"


@pytest.mark.parametrize("keep", [10, 0.5, -30])  # bytes kept: the first 10, half, all but the last 30
def test_a_truncated_file(saved: Path, keep: float) -> None:
    data = saved.read_bytes()
    cut = data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep]
    saved.write_bytes(cut)
    assert _refusal(saved) == f"truncated ({len(cut)} bytes; the end of its zip archive is missing)"


def test_garbage_and_text_are_not_pytorch_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    assert _refusal(garbage) == "not a PyTorch file (neither a zip archive nor a pickle)"
    text = tmp_path / "notes.pt"
    text.write_text("model: vit_small\n")
    assert _refusal(text) == "not a PyTorch file (neither a zip archive nor a pickle)"


def test_a_plain_pickle_is_not_a_pytorch_file(tmp_path: Path) -> None:
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    assert _refusal(path) == "not a PyTorch file (a pickle that torch.save did not write, or a damaged one)"


def test_flipped_bytes_inside_a_tensor_are_found_by_the_crc(saved: Path) -> None:
    """torch.load itself would return the damaged weights without a word."""
    with zipfile.ZipFile(saved) as archive:
        member = next(info for info in archive.infolist() if info.filename.endswith("data/0"))
    data = bytearray(saved.read_bytes())
    start = member.header_offset + 200  # inside the stored (uncompressed) tensor bytes
    data[start : start + 16] = b"\xff" * 16
    saved.write_bytes(bytes(data))
    assert _refusal(saved) == f"damaged (member {member.filename!r} fails its CRC-32 check)"


def test_files_written_without_crcs_still_load(tmp_path: Path) -> None:
    path = tmp_path / "no_crc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.ones(5)}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(path) as archive:
        assert all(info.CRC == 0 for info in archive.infolist() if info.file_size)
    assert torch.equal(load_torch_file(path)["w"], torch.ones(5))


def test_objects_other_than_tensors_are_refused_and_never_run(tmp_path: Path, caplog) -> None:
    marker = tmp_path / "the_pickle_ran"
    path = tmp_path / "object.pt"
    torch.save({"w": torch.zeros(2), "extra": Payload(marker)}, path)
    with caplog.at_level(logging.DEBUG, logger="cpews.torch_files"):
        reason = _refusal(path)
    assert reason == "contains objects other than tensors (os.makedirs); such files are never unpickled"
    assert not marker.exists()
    # PyTorch's own explanation is kept for whoever turns the debug log on
    assert any("Weights only load failed" in record.exc_text for record in caplog.records if record.exc_text)


def test_a_truncated_legacy_file(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(64)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert _refusal(path) == "truncated (the pickle ends early)"


class Settings:
    """A plain class instance: not a tensor, so not loadable with weights only."""

    lr = 0.1


def test_an_instance_of_a_class_is_named(tmp_path: Path) -> None:
    path = tmp_path / "settings.pt"
    torch.save({"w": torch.zeros(2), "settings": Settings()}, path)
    reason = _refusal(path)
    assert reason.startswith("contains objects other than tensors (") and ".Settings);" in reason, reason


def test_backbone_weights_that_do_not_load_are_one_line(tmp_path: Path) -> None:
    """`model.weights` goes through the same reading: the file and the reason, nothing of PyTorch's text."""
    from cpews.model.backbone import ViTBackbone, load_backbone_weights

    backbone = ViTBackbone("vit_base_patch16_224", ism_depth=1, img_size=32, patch_size=8, embed_dim=16, depth=1,
                           num_heads=2)
    path = tmp_path / "backbone.pt"
    torch.save(backbone.vit.state_dict(), path)
    load_backbone_weights(backbone.vit, path)  # whole: loads
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError) as info:
        load_backbone_weights(backbone.vit, path)
    assert str(info.value) == (
        f"model.weights={str(path)!r}: not a loadable state dict: truncated ({path.stat().st_size} bytes; the end "
        "of its zip archive is missing)"
    )
    torch.save({"state_dict": backbone.vit.state_dict(), "args": Settings()}, path)
    with pytest.raises(ValueError, match=r"not a loadable state dict: contains objects other than tensors \(.*Settings\)"):
        load_backbone_weights(backbone.vit, path)
