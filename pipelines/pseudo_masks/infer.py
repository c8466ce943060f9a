"""The model stage of the pseudo-mask pipeline: multi-scale + flip inference in an actor pool
(`MaskPredictor`, bf16 autocast on GPU), handing on float16 planes of the allowed classes to
the CPU stage of the CRF (`rows.postprocess_rows`).
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from pipelines.io.codecs import decode_rgb
from pipelines.pseudo_masks.rows import GT, IMAGE, META, PROBS
from weakclip.config import InferenceConfig
from weakclip.inference import multiscale_probabilities


def allowed_classes(labels: Sequence[int], num_classes: int, *, restrict: bool) -> list[int]:
    """Class ids whose planes are kept: background + `labels` when restricted, else all K."""
    if not restrict:
        return list(range(num_classes))
    return [0, *sorted({int(c) for c in labels if 0 < int(c) < num_classes})]


def predict_probabilities(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    classes: Sequence[int],
    *,
    num_classes: int,
    inference: InferenceConfig,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    device: torch.device,
) -> np.ndarray:
    """C x H x W float16 probabilities of the C ascending `classes` for one H x W x 3 uint8
    RGB image, averaged over the scales and flips of `inference`.

    `model_fn` maps B x 3 x h x w normalised images (`pixel_mean`, `pixel_std` on the 0-255
    scale) to B x K x h' x w' logits; with C < K the other classes get -inf logits before
    every softmax (the restriction of docs/METHOD.md), so the kept planes sum to 1.
    """
    if len(classes) == 1:  # nothing to choose between: skip the model
        return np.ones((1, *image.shape[:2]), np.float16)
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device)  # H x W x 3 uint8
    mean = torch.tensor(pixel_mean, dtype=torch.float32, device=device)
    std = torch.tensor(pixel_std, dtype=torch.float32, device=device)
    normalised = ((tensor.float() - mean) / std).permute(2, 0, 1)[None].contiguous()  # 1x3xHxW
    index = torch.tensor(list(classes), dtype=torch.long, device=device)
    class_mask = None
    if len(classes) < num_classes:
        class_mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
        class_mask[index] = True
    probs = multiscale_probabilities(
        model_fn,
        normalised,
        num_classes=num_classes,
        scales=inference.scales,
        short_side=inference.short_side,
        flip=inference.flip,
        window=inference.window,
        stride=inference.stride,
        class_mask=class_mask,
        pad_small=inference.pad_small_images,
    )  # K x H x W float32
    return probs.index_select(0, index).to(torch.float16).cpu().numpy()


class MaskPredictor:
    """Ray Data actor: `meta`, `image`, `gt` rows in; the same plus `probs` out.

    Rejected rows (`meta["reason"]`) pass through untouched with empty `probs`.
    """

    def __init__(
        self,
        *,
        checkpoint: Any,
        sha256: str,
        inference: InferenceConfig,
        use_gpu: bool,
        threads: int | None = None,
        released_config: Any = None,
    ) -> None:
        """`checkpoint`: its bytes, or a one-element list holding their ObjectRef, with the
        verified digest `sha256`; `use_gpu`: run on CUDA (the actor was given a GPU);
        `threads`: torch CPU threads (None keeps torch's default); `released_config`: the
        model config of a released checkpoint (`build_model`)."""
        from pipelines.pseudo_masks.checkpoint import build_model

        if isinstance(checkpoint, list):
            import ray

            checkpoint = ray.get(checkpoint[0])
        if threads is not None:
            torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model, config = build_model(checkpoint, sha256=sha256, released_config=released_config)
        del checkpoint
        self.model = model.to(self.device)
        self.num_classes = len(model.class_names)
        self.pixel_mean = tuple(config.clip.pixel_mean)
        self.pixel_std = tuple(config.clip.pixel_std)
        self.inference = inference

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        metas, probs_out = [], []
        cuda = self.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
        with torch.inference_mode(), autocast:
            for meta_json, image_bytes in zip(batch[META], batch[IMAGE], strict=True):
                meta = json.loads(meta_json)
                probs_out.append(b"" if meta.get("reason") else self._predict(meta, image_bytes))
                metas.append(json.dumps(meta))
        return {
            META: np.asarray(metas, dtype=object),
            IMAGE: batch[IMAGE],
            GT: batch[GT],
            PROBS: np.asarray(probs_out, dtype=object),
        }

    def _predict(self, meta: dict[str, Any], image_bytes: bytes) -> bytes:
        """The probabilities of one row (b"" and `meta["reason"]` when it fails); `meta` gains
        `prob_classes`, `infer_s` and `actor`."""
        started = time.perf_counter()
        classes = allowed_classes(
            meta["labels"], self.num_classes, restrict=self.inference.restrict_to_image_classes
        )
        probs = b""
        try:
            image = decode_rgb(bytes(image_bytes), height=meta["height"], width=meta["width"])
            probs = predict_probabilities(
                lambda images: self.model(images).logits,
                image,
                classes,
                num_classes=self.num_classes,
                inference=self.inference,
                pixel_mean=self.pixel_mean,
                pixel_std=self.pixel_std,
                device=self.device,
            ).tobytes()
            meta["prob_classes"] = classes
        except ValueError as exc:  # RowRejected included
            meta["reason"] = getattr(exc, "reason", f"inference failed: {exc}")
        meta["infer_s"] = time.perf_counter() - started
        meta["actor"] = self._memory()
        return probs

    def _memory(self) -> dict[str, Any]:
        """This actor's id and peak memory (resident set; CUDA allocations on GPU)."""
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        usage = {"id": f"{os.uname().nodename}:{os.getpid()}", "rss_mb": rss_mb}
        if self.device.type == "cuda":
            usage["cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return usage
