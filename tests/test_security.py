"""Files quest reads are data, not code: a checkpoint holding a pickled object is refused without
running it, and the error does not advise loading it with weights_only=False."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny

from quest import train
from quest.codebook import CodebookError, load_codebook
from quest.student import ModelError, load_state


class Payload:
    """Unpickling this calls open(marker, 'w'): the marker file appears when the pickle runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_payload(path: Path, marker: Path, legacy: bool) -> Path:
    obj = {"model": {"conv1.weight": torch.zeros(1)}, "extra": Payload(marker)}
    if legacy:  # a plain pickle file (torch.load reads those too)
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path)
    return path


@pytest.fixture(params=["torch_zip", "legacy_pickle"])
def payload(request, tmp_path) -> tuple[Path, Path]:
    legacy = request.param == "legacy_pickle"
    # The payload really runs when unpickled without the weights-only restriction.
    probe_marker = tmp_path / "probe_marker"
    probe = write_payload(tmp_path / "probe.pth", probe_marker, legacy)
    try:  # a plain pickle runs, then torch finds no magic number in it
        torch.load(probe, weights_only=False)
    except RuntimeError:
        assert legacy
    assert probe_marker.exists()
    marker = tmp_path / "marker"
    return write_payload(tmp_path / "ckpt_epoch_240.pth", marker, legacy), marker


def check_refused(err: Exception, marker: Path) -> None:
    assert not marker.exists(), "the checkpoint's pickle ran"
    message = str(err)
    assert "weights_only=False" not in message and "\n" not in message
    assert "never unpickles" in message


def test_load_state_refuses_a_pickled_object(payload):
    path, marker = payload
    with pytest.raises(ModelError) as err:
        load_state(path)
    check_refused(err.value, marker)


def test_teacher_checkpoint_with_a_pickled_object_is_refused(tmp_path, payload):
    path, marker = payload
    recipe = tiny(tmp_path, "s", method="kd", teacher=path, optim__epochs=1)
    with pytest.raises(ModelError) as err:
        train.main([str(recipe)])
    check_refused(err.value, marker)
    assert str(path) in str(err.value)


def test_codebook_with_a_pickled_object_is_refused(payload):
    path, marker = payload
    with pytest.raises(CodebookError):
        load_codebook(path)
    assert not marker.exists(), "the codebook's pickle ran"
