"""Hostile checkpoint files: malicious pickles never run; every bad file is a clear error.

The corpus (`tests.reliability.hostile_checkpoints.bad_checkpoints`): a legacy raw pickle and a
`torch.save` zip whose unpickling would call `os.system("touch SENTINEL")`, the same zip
disguised as a TorchScript archive, a safe file of another format, a truncated file, random
bytes and an empty file. No Ray is started here: every loader refuses before any distributed work.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.io.storage import resolve
from pipelines.train import export
from pipelines.training import checkpoint
from tests.reliability import hostile, hostile_checkpoints
from tests.reliability.hostile_tools import one_error_line, write_ingest_output

KINDS = tuple(hostile_checkpoints.bad_checkpoints("unused"))


def _write_corpus(directory: Path, sentinel: Path, name: str) -> dict[str, Path]:
    """One directory per kind holding the hostile bytes under `name`."""
    paths = {}
    for kind, data in hostile_checkpoints.bad_checkpoints(str(sentinel)).items():
        (directory / kind).mkdir(parents=True)
        path = directory / kind / name
        path.write_bytes(data)
        paths[kind] = path
    return paths


def _refusals(
    paths: dict[str, Path], load: Callable[[Path], object], sentinel: Path
) -> dict[str, str]:
    """kind -> the ValueError message of `load`; fails on success, other errors, or code run."""
    messages = {}
    for kind, path in paths.items():
        with pytest.raises(ValueError) as info:
            load(path)
        assert not sentinel.exists(), f"{kind}: the malicious pickle ran"
        message = " ".join(str(info.value).split())
        assert str(path) in message or path.parent.name in message, (kind, message)
        messages[kind] = message
    return messages


def test_pseudo_masks_job_refuses_every_bad_model_file(tmp_path: Path, capfd, reliability):
    reliability.case(
        kind="input",
        name="pseudo_masks: --checkpoint is a malicious or foreign model.pt",
        injected=f"`jobs.pseudo_masks --checkpoint` given each of: {', '.join(KINDS)}",
        checked="exit 1 with one stderr line naming the checkpoint; the sentinel file the "
        "malicious pickles would create never appears; no output is written",
    )
    pytest.importorskip("jobs.pseudo_masks")
    from jobs.pseudo_masks import main

    sentinel = tmp_path / "pickle-ran"
    paths = _write_corpus(tmp_path / "corpus", sentinel, "model.pt")
    source = resolve(str(tmp_path / "ingest"))
    write_ingest_output(source, [hostile.good_ingest_rows(2)])
    for kind, path in paths.items():
        out = resolve(str(tmp_path / "out" / kind))
        status = main(
            ["--input", source.uri, "--checkpoint", str(path), "--output", out.uri, "--no-crf"]
        )
        line = one_error_line(capfd.readouterr().err)
        assert status == 1, (kind, line)
        assert "checkpoint" in line.lower() and kind in line, (kind, line)
        assert not sentinel.exists(), f"{kind}: the malicious pickle ran"
        assert not os.path.exists(out.path) or not os.listdir(out.path), kind
        reliability.observe(f"{kind}: {line[:220]}")


def test_checkpoint_loaders_refuse_every_bad_file(tmp_path: Path, reliability):
    reliability.case(
        kind="input",
        name="train checkpoints and model.pt export: malicious or foreign files",
        injected=(
            f"each of {', '.join(KINDS)} as `model.pt` (`train.export.load_exported_model`), as "
            "a resume checkpoint's `train_state.pt` (`read_train_state`) and `clip_state.pt` "
            "(`read_clip_state`)"
        ),
        checked="a ValueError naming the file every time; the sentinel never appears",
    )
    sentinel = tmp_path / "pickle-ran"
    loaders: dict[str, Callable[[Path], object]] = {
        "model.pt": lambda p: export.load_exported_model(str(p)),
        checkpoint.TRAIN_STATE: lambda p: checkpoint.read_train_state(str(p.parent)),
        checkpoint.CLIP_STATE: lambda p: checkpoint.read_clip_state(str(p.parent)),
    }
    for label, load in loaders.items():
        paths = _write_corpus(tmp_path / label, sentinel, label)
        messages = _refusals(paths, load, sentinel)
        reliability.observe(f"{label}: {len(messages)} of {len(KINDS)} files refused")
        if label == "model.pt":
            for kind in ("malicious_torch_save", "torchscript_disguise", "wrong_format"):
                reliability.observe(f"{kind}: {messages[kind][:220]}")


def test_clip_weights_loader_refuses_every_bad_file(tmp_path: Path, reliability):
    reliability.case(
        kind="input",
        name="train --clip-weights: malicious or foreign weights file",
        injected=f"each of {', '.join(KINDS)} as the CLIP weights file "
        "(`weakclip.build.read_clip_state_dict`)",
        checked="a ValueError naming the file every time (the TorchScript disguise included); "
        "the sentinel never appears",
    )
    from weakclip.build import read_clip_state_dict

    sentinel = tmp_path / "pickle-ran"
    paths = _write_corpus(tmp_path / "clip", sentinel, "clip.pt")
    messages = _refusals(paths, lambda p: read_clip_state_dict(str(p)), sentinel)
    reliability.observe(f"{len(messages)} of {len(KINDS)} files refused")
    reliability.observe(f"torchscript_disguise: {messages['torchscript_disguise'][:220]}")


def test_retrain_loaders_refuse_every_bad_file(tmp_path: Path, reliability):
    reliability.case(
        kind="input",
        name="retrain: malicious or foreign model.pt / backbone weights",
        injected=f"each of {', '.join(KINDS)} as a retrained `model.pt` "
        "(`retrain.model.read_export`) and as backbone weights (`read_weights_file`)",
        checked="a ValueError naming the file every time; the sentinel never appears",
    )
    retrain_model = pytest.importorskip("pipelines.retrain.model")
    sentinel = tmp_path / "pickle-ran"
    for label, load in (
        ("model.pt", lambda p: retrain_model.read_export(str(p))),
        ("weights.pt", lambda p: retrain_model.read_weights_file(str(p))),
    ):
        paths = _write_corpus(tmp_path / label, sentinel, label)
        messages = _refusals(paths, load, sentinel)
        reliability.observe(f"{label}: {len(messages)} of {len(KINDS)} files refused")
