"""The checkpoint directory both training stages report (one per `ray.train.report`), and the
`model.pt` writer and reader both exports share (`write_export`, `read_export_payload`).

- `train_state.pt`: the state dict without the frozen CLIP parameters, the optimizer and
  LR-scheduler states and the iteration (`torch.save`, read with `weights_only=True`);
- `clip_state.pt`: only for a randomly initialised CLIP (no weights file to rebuild it from);
- `meta.json`: iteration, config, class names, weights source and SHA-256, run signature;
- `metrics.jsonl`: every logged row so far, so the final metrics survive failures and resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from weakclip.build import build_weakclip, is_torchscript_archive
from weakclip.config import WeakCLIPConfig, from_dict
from weakclip.model import WeakCLIP

TRAIN_STATE = "train_state.pt"
CLIP_STATE = "clip_state.pt"
META = "meta.json"
METRICS = "metrics.jsonl"


def load_weights_only(source: str | bytes, *, what: str, where: str | None = None) -> Any:
    """`torch.load(..., weights_only=True)` of a file or its bytes on the CPU; a refusal becomes
    one clear line. Untrusted files never run code: torch's restricted unpickler refuses every
    global it does not know.

    Raises:
        ValueError: not a `torch.save` file, truncated, or refused as unsafe (the message names
            the file, `where`, and the refused global).
    """
    where = where or repr(source)
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    if is_torchscript_archive(handle):  # torch.load would hand it to torch.jit.load
        raise ValueError(f"{what} {where} is a TorchScript archive (code), refused unloaded")
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign, torn or unsafe files
        text = str(exc)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        refused = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
        if text.startswith("Weights only load failed"):
            detail = "refused by the restricted unpickler: " + (
                refused[0] if refused else "not plain tensor data"
            )
        else:
            detail = f"{type(exc).__name__}: {lines[0][:300] if lines else 'unreadable'}"
        raise ValueError(
            f"{what} {where} cannot be loaded with weights_only=True: {detail}"
        ) from None


def read_export_payload(
    source: str | bytes, *, fmt: str, kind: str, where: str | None = None
) -> dict[str, Any]:
    """A `model.pt` payload (train's or retrain's), read with `weights_only=True` and checked:
    a dict with the format tag `fmt`, `class_names` a non-empty list of strings, a `config`
    dict and a `state_dict`.

    Raises:
        ValueError: unloadable (`load_weights_only`), not a `kind` export, or a bad field.
    """
    where = where or repr(source)
    payload = load_weights_only(source, what=f"{kind} export", where=where)
    return check_export_payload(payload, fmt=fmt, kind=kind, where=where)


def check_export_payload(payload: Any, *, fmt: str, kind: str, where: str) -> dict[str, Any]:
    """`read_export_payload`'s checks of an already loaded payload."""
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{where} is not a {kind} export ({fmt})")
    names = payload.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: class_names must be a list of strings")
    if not all(isinstance(payload.get(key), dict) for key in ("config", "state_dict")):
        raise ValueError(f"{where}: config or state_dict missing")
    return payload


def write_export(
    path: str, *, fmt: str, model: nn.Module, config: Mapping[str, Any], **fields: Any
) -> None:
    """Writes a `model.pt` (`read_export_payload` reads it): the format tag `fmt`, `config`,
    every weight of `model` (detached, contiguous, on the CPU) and further plain `fields`."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"format": fmt, "config": dict(config), "state_dict": state, **fields}, path)


def weakclip_from_export(payload: Mapping[str, Any]) -> tuple[WeakCLIP, WeakCLIPConfig]:
    """The `WeakCLIP` of a train `model.pt` payload, in eval mode, and its config.

    Built with random CLIP weights, then every weight is loaded strictly: no CLIP weights file
    is needed.
    """
    config = from_dict(payload["config"], WeakCLIPConfig)
    model = build_weakclip(config, payload["class_names"], clip_weights=None)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval(), config


def frozen_parameter_names(model: nn.Module) -> set[str]:
    """Names of the frozen CLIP parameters; call on a freshly built model.

    Layers frozen later for other reasons (the dead co-attention layers of
    `chain_layers=False`) are not CLIP weights and stay in the trainable state.
    """
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def state_part(model: nn.Module, frozen: Iterable[str], *, clip: bool) -> dict[str, torch.Tensor]:
    """The state dict without the `frozen` CLIP parameters (or, `clip`, only those), on the CPU."""
    names = set(frozen)
    state = model.state_dict().items()
    return {k: v.detach().cpu().clone() for k, v in state if (k in names) == clip}


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict (key order free)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(
    directory: str,
    *,
    model: nn.Module,
    frozen: Iterable[str],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    iteration: int,
    meta: Mapping[str, Any],
    metrics: Sequence[Mapping[str, Any]],
    include_clip: bool,
) -> None:
    """Writes a checkpoint into the existing local `directory` (see the module docstring);
    `frozen` are the model's `frozen_parameter_names`, saved only with `include_clip`."""
    state = {
        "model": state_part(model, frozen, clip=False),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iteration": int(iteration),
    }
    torch.save(state, os.path.join(directory, TRAIN_STATE))
    if include_clip:
        torch.save(state_part(model, frozen, clip=True), os.path.join(directory, CLIP_STATE))
    with open(os.path.join(directory, METRICS), "w", encoding="utf-8") as handle:
        handle.write(jsonl(metrics))
    # Written last: a directory with meta.json has every other file.
    with open(os.path.join(directory, META), "w", encoding="utf-8") as handle:
        json.dump({**meta, "iteration": int(iteration)}, handle, indent=1, sort_keys=True)


def jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    """`rows` as JSON lines (keys sorted), as `metrics.jsonl` files hold them."""
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def read_meta(directory: str) -> dict[str, Any]:
    """The checkpoint's `meta.json`."""
    with open(os.path.join(directory, META), encoding="utf-8") as handle:
        meta = json.load(handle)
    if not isinstance(meta, dict) or not isinstance(meta.get("iteration"), int):
        raise ValueError(f"checkpoint {directory!r} has no valid {META}")
    return meta


def read_metrics(directory: str) -> list[dict[str, Any]]:
    """The logged iterations stored in a checkpoint."""
    path = os.path.join(directory, METRICS)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_train_state(directory: str) -> dict[str, Any]:
    """`train_state.pt` (model, optimizer, scheduler, iteration), read with weights_only."""
    state = load_weights_only(os.path.join(directory, TRAIN_STATE), what="checkpoint state")
    keys = {"model", "optimizer", "scheduler", "iteration"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise ValueError(f"checkpoint {directory!r}: {TRAIN_STATE} is incomplete")
    return state


def has_clip_state(directory: str) -> bool:
    """Whether the checkpoint stores its random-init CLIP weights (`read_clip_state` loads them)."""
    return os.path.exists(os.path.join(directory, CLIP_STATE))


def read_clip_state(directory: str) -> dict[str, torch.Tensor] | None:
    """The stored random-init CLIP weights, or None when CLIP came from a weights file."""
    if not has_clip_state(directory):
        return None
    path = os.path.join(directory, CLIP_STATE)
    state = load_weights_only(path, what="checkpoint CLIP weights")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"checkpoint CLIP weights {path!r} are not a state dict of tensors")
    return state
