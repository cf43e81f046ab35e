"""Host-to-device copy of a loader `Batch`, and GPU decode + resize for `data.decode: gpu`.

    images, labels = to_device(batch, device)   # uint8 [B,3,S,S] on the device, either mode

With `decode: gpu` the reader's workers ship the JPEG bytes (`data_pipelines.reader.JpegList`)
and the decode runs here, in the trainer process, on the staging stream: one batched nvJPEG call
and one batched antialiased resize (the geometry of the CPU path: shorter side to S, centre
crop), whatever the mix of image sizes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from data_pipelines.images import BadImage, center_square
from data_pipelines.reader import Batch
from lsdr_repr.errors import DataError

log = logging.getLogger(__name__)


def to_device(batch: Batch, device: torch.device | str, non_blocking: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [B,3,S,S], int64 labels [B]) on `device`, for either decode mode."""
    device = torch.device(device)
    labels = batch.labels.to(device, non_blocking=non_blocking)
    if isinstance(batch.images, torch.Tensor):
        return batch.images.to(device, non_blocking=non_blocking), labels
    side = getattr(batch.images, "image_size", 0)
    if not side:
        raise DataError("a batch of raw JPEGs without its image size: use decode_jpeg_batch")
    return decode_jpeg_batch(batch.images, side, device), labels


def decode_jpeg_batch(jpegs: Sequence[torch.Tensor], size: int, device: torch.device | str
                      ) -> torch.Tensor:
    """B JPEGs (1-D uint8 tensors) -> uint8 [B,3,size,size] on `device`.

    One batched nvJPEG call on CUDA (torchvision.io.decode_jpeg on a list, the hardware JPEG
    decoder where the GPU has one), then one batched resize for the whole batch, whatever the
    mix of image sizes (antialiased bilinear: shorter side to `size`, centre crop; see
    `resize_center_crop_batch`): no per-image Python work beyond one copy each. An image that
    fails to decode falls back to PIL on the CPU; if that fails too it is replaced by the batch's
    previous image (logged) so every rank keeps its batch size.
    """
    device = torch.device(device)
    try:
        decoded = _decode_jpeg(list(jpegs), device)
    except RuntimeError:
        decoded = [_decode_one(j, device) for j in jpegs]
    good = [i for i, img in enumerate(decoded) if img is not None]
    if not good:
        raise DataError("no image of the batch could be decoded")
    images = [decoded[i] for i in good]
    if len({tuple(img.shape[-2:]) for img in images}) == 1:
        resized = resize_center_crop(torch.stack(images), size)
    else:
        resized = resize_center_crop_batch(images, size)
    if len(good) == len(decoded):
        return resized
    log.warning("%d of %d JPEGs in a batch could not be decoded; repeating neighbours",
                len(decoded) - len(good), len(decoded))
    # each failed image takes the nearest good one before it (the first good one at the start)
    source = torch.tensor([max(sum(g <= i for g in good) - 1, 0) for i in range(len(decoded))],
                          device=resized.device)
    return resized[source]


def _decode_jpeg(data: Any, device: torch.device) -> Any:
    """torchvision's nvJPEG / libjpeg-turbo decode (a tensor or a list of them), RGB out."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of torchcodec; they still work
        # and torchcodec is not a dependency of this project.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(jpeg: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode_jpeg(jpeg, device)
    except RuntimeError:
        pass
    try:
        from data_pipelines.images import open_image, to_rgb

        img, _ = to_rgb(open_image(jpeg.numpy().tobytes()))
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        return arr.permute(2, 0, 1).to(device)
    except BadImage:
        return None


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N,3,H,W] -> uint8 [N,3,size,size]: shorter side to size (antialiased bilinear),
    centre crop (`data_pipelines.images.center_square`, the CPU path's crop)."""
    top, left, side = center_square(*images.shape[-2:])
    images = images[..., top:top + side, left:left + side]
    if side == size:
        return images.contiguous()
    resized = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                              antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def resize_matrix(lengths: torch.Tensor, size: int, padded: int, dtype: torch.dtype
                  ) -> torch.Tensor:
    """Resampling matrices R [B,size,padded]: `R[b] @ v` resizes v[:lengths[b]] (a signal
    zero-padded to `padded`) to `size` samples with antialiased bilinear weights.

    The weights are torch's / PIL's antialiased bilinear filter: a triangle of half-width
    max(1, lengths/size) source pixels around each output pixel's centre, cut at the signal's
    ends and renormalised; columns at and beyond lengths[b] are 0. lengths: [B] int.
    """
    length = lengths.to(torch.float32)[:, None, None]  # [B,1,1]
    scale = length / size
    support = scale.clamp(min=1.0)
    centre = (torch.arange(size, device=lengths.device, dtype=torch.float32)[None, :, None]
              + 0.5) * scale  # [B,size,1]
    pixel = torch.arange(padded, device=lengths.device, dtype=torch.float32)[None, None, :] + 0.5
    weights = (1.0 - (pixel - centre).abs() / support).clamp_(min=0.0)
    weights = weights * (pixel < length)
    return (weights / weights.sum(dim=2, keepdim=True)).to(dtype)


def resize_center_crop_batch(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """B uint8 [3,H_i,W_i] images of any sizes -> uint8 [B,3,size,size], each as
    `resize_center_crop` would make it (centre square of side min(H_i,W_i), resized).

    The centre squares are copied into one zero-padded batch [B,3,M,M] (M: the largest side),
    then resized by two batched matmuls with per-image matrices (`resize_matrix`): out_b =
    R_b X_b R_b^T. In float16 on CUDA (tensor cores; pixel values are exact in float16), so the
    cost is a few small GEMMs for any mix of sizes, where a resize per image costs a launch chain
    per image (46 ms per batch of 256 in a prototype).
    """
    device = images[0].device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    boxes = [center_square(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    sides = [side for _, _, side in boxes]
    m = max(sides)
    padded = torch.zeros((len(images), 3, m, m), dtype=dtype, device=device)
    for i, (img, (top, left, side)) in enumerate(zip(images, boxes, strict=True)):
        padded[i, :, :side, :side].copy_(img[:, top:top + side, left:left + side])
    r = resize_matrix(torch.tensor(sides, device=device), size, m, dtype)  # [B,size,M]
    rows = torch.matmul(padded.view(len(images), 3 * m, m), r.transpose(1, 2))  # [B,3M,size]
    out = torch.matmul(r[:, None], rows.view(len(images), 3, m, size))  # [B,3,size,size]
    return out.round_().clamp_(0, 255).to(torch.uint8)
