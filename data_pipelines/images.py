"""Image decoding shared by the writer, the verifier and the reader (PIL, CPU).

Writer side: `prepare_jpeg(data)` turns any file PIL can open into RGB JPEG bytes (or the original
bytes when they already are a plain RGB JPEG of the right size), or raises `BadImage` with a
reason. Reader side: `decode_to_square(data, size)` decodes and resizes to a `size x size` RGB
array: the shorter side is resized to `size` and the longer side centre-cropped (the
random-resized-crop on the GPU then works inside that square).
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own error limit (2 x MAX_IMAGE_PIXELS): ~13k x 13k
EXIF_ORIENTATION = 0x0112
JPEG_SOI = b"\xff\xd8"


class BadImage(Exception):
    """A source file or a shard member that cannot become an RGB image; str() is the reason."""


@dataclass
class Prepared:
    jpeg: bytes
    original_size: tuple[int, int]  # (width, height) as stored in the file, before EXIF rotation
    size: tuple[int, int]  # (width, height) of the JPEG written
    original_format: str
    original_mode: str
    reencoded: bool
    notes: list[str]  # conversions applied: "exif-rotated", "cmyk", "alpha", "16-bit" ...


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Refuse any image of more than `max_pixels` pixels, from its header, before decoding.

    PIL only warns between MAX_IMAGE_PIXELS and twice that (and raises above); the warning is
    turned into an error here, so a header claiming 50000 x 50000 is never decoded.
    """
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def open_image(data: bytes, draft_side: int | None = None) -> Image.Image:
    """Open and fully decode `data` (so truncation shows here). Raises `BadImage`.

    Must run inside `pixel_limit` for the bomb check to be strict.
    """
    if not data:
        raise BadImage("empty (zero bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated GIF/WebP/TIFF: the first frame
        if draft_side is not None and img.format == "JPEG":
            # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding: both sides stay >= draft_side
            img.draft("RGB", (draft_side, draft_side))
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb refused ({exc})") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image PIL can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as exc:
        raise BadImage(f"undecodable image ({type(exc).__name__}: {exc})") from None
    if img.width < 1 or img.height < 1:
        raise BadImage(f"degenerate image size {img.size}")
    return img


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to RGB the way a viewer would show it; returns (image, note).

    - CMYK: through the embedded ICC profile when there is one, else PIL's conversion;
    - 16-bit and 32-bit integer / float greyscale: scaled to 8 bits (I;16 by 1/257; I and F by
      1/257 when within 0..65535, otherwise min-max), not clipped;
    - anything with transparency (RGBA, LA, PA, P or L with a transparent colour): composited
      over white, so pixels hidden under alpha=0 (often garbage) never show;
    - L, 1, P, YCbCr, LAB, HSV ...: PIL's conversion.
    """
    mode = img.mode
    if mode == "RGB" and not img.has_transparency_data:
        return img, None
    if mode == "CMYK":
        icc = img.info.get("icc_profile")
        if icc:
            try:
                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                dst = ImageCms.createProfile("sRGB")
                return ImageCms.profileToProfile(img, src, dst, outputMode="RGB"), "cmyk-icc"
            except (ImageCms.PyCMSError, OSError, ValueError):
                pass
        return img.convert("RGB"), "cmyk"
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if mode.startswith("I;16") or (lo >= 0 and hi <= 65535 and hi > 255):
            arr = arr / 257.0
        elif lo < 0 or hi > 65535:
            arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB"), "16-bit" if mode != "F" else "float"
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB"), "alpha"
    return img.convert("RGB"), mode.lower()


def prepare_jpeg(data: bytes, *, max_side: int | None, quality: int,
                 min_side: int | None = None) -> Prepared:
    """Source file bytes -> RGB JPEG bytes for a shard. Raises `BadImage` with the reason.

    `max_side`: the longer side at most; `min_side`: the shorter side shrunk to it (never
    enlarged), the pre-shrink that matches a reader at `data.image_size = min_side`: a longer-
    side bound leaves the shorter side of wide images below the reader's side, which then
    upsamples them. The original bytes are kept when the file is a baseline RGB JPEG with no
    EXIF rotation to apply and nothing to shrink; everything else is converted and re-encoded.
    """
    bounds = [s for s in (max_side, min_side) if s]
    draft = min(bounds) if bounds else None  # DCT downscale keeping both sides >= draft
    img = open_image(data, draft_side=draft)
    fmt, mode = img.format or "?", img.mode
    # The size stored in the file (draft may have decoded a reduced version).
    original_size = _file_size(data, img)
    notes: list[str] = []
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    if orientation not in (1, None):
        try:
            img = ImageOps.exif_transpose(img)
        except (ValueError, OSError, TypeError) as exc:
            raise BadImage(f"bad EXIF orientation ({exc})") from None
        notes.append("exif-rotated")
    rgb, note = to_rgb(img)
    if note:
        notes.append(note)
    if min_side and min(rgb.size) > min_side:
        scale = min_side / min(rgb.size)
        target = tuple(max(min_side, round(side * scale)) for side in rgb.size)
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        notes.append("resized")
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
        if "resized" not in notes:
            notes.append("resized")
    keep = (
        fmt == "JPEG" and mode == "RGB" and not notes and rgb.size == original_size
        and data[:2] == JPEG_SOI
    )
    if keep:
        jpeg = data
    else:
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
        jpeg = buf.getvalue()
    return Prepared(jpeg=jpeg, original_size=original_size, size=rgb.size, original_format=fmt,
                    original_mode=mode, reencoded=not keep, notes=notes)


def _file_size(data: bytes, img: Image.Image) -> tuple[int, int]:
    if img.format != "JPEG":
        return img.size
    with Image.open(io.BytesIO(data)) as header:  # header only: no decode
        return header.size


def decode_to_square(data: bytes, size: int) -> np.ndarray:
    """JPEG (or any PIL image) bytes -> uint8 array [size, size, 3]. Raises `BadImage`.

    Resize so the shorter side is `size` (antialiased bilinear), centre-crop the longer side.
    JPEGs much larger than `size` are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (PIL `draft`),
    never below `size`: most of the cost of decoding a large photo is skipped.
    """
    img = open_image(data, draft_side=size)
    if img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)  # shards from other writers may still carry it
    img, _ = to_rgb(img)
    return fit_square(np.asarray(img, dtype=np.uint8), size)


def center_square(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the centred square of side min(height, width), on whole pixels: the
    crop of every resize-to-square path (CPU workers and GPU decode)."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def fit_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H,W,3] -> uint8 [size,size,3]: the centred square of side min(H,W), resized with
    antialiased bilinear weights (PIL's filter).

    Through torch's uint8 channels-last kernel: 0.26-0.32 ms against PIL's 1.29 ms for the
    benchmark's photos (about 400 px squares to 256, one core), where decoding itself takes 1.33
    ms. Pixels differ from PIL's `ImageOps.fit` by rounding (mean 0.01 levels) and by its sub-pixel
    crop offset (`center_square`, shared with the GPU decode path).
    """
    top, left, side = center_square(*rgb.shape[:2])
    square = rgb[top:top + side, left:left + side]
    if side == size:
        return square.copy()  # writable and contiguous, as the resized arrays are
    import torch  # here, not at the top: the shard writer uses this module without torch

    with warnings.catch_warnings():
        # PIL's arrays are read-only; torch only reads this one
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        hwc = torch.from_numpy(square).unsqueeze(0)  # [1,H,W,3]
    # [1,3,H,W] in channels-last memory, the kernel's fast layout (permuting after the unsqueeze
    # gives the batch dimension a stride torch reads as channels-last, so the output is too)
    chw = hwc.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(chw, size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
    # channels-last in, channels-last out: [S,S,3] is a view (copied only if torch ever
    # returned the other layout)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


def jpeg_header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG header without decoding pixels. Raises `BadImage`."""
    if len(data) < 4 or data[:2] != JPEG_SOI:
        raise BadImage("not a JPEG (no SOI marker)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                raise BadImage(f"not a JPEG ({img.format})")
            return img.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"bad JPEG header ({exc})") from None
