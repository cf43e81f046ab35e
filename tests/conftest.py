"""Shared fixtures: small real image sources and shard directories written by the real writer."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def save_image(path: Path, size: tuple[int, int] = (24, 20), seed: int = 0, mode: str = "RGB",
               fmt: str | None = None) -> Path:
    """A small noisy image of `size` (w, h) in `mode`, saved as `fmt` (from the suffix if None)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def png_bomb_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (RGB, 8 bit) with one empty IDAT chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """ImageFolder layout: 3 classes x 8 images (JPEG and PNG, varied sizes) = 24 images."""
    root = tmp_path_factory.mktemp("image_folder")
    for c, name in enumerate(["ant", "bee", "cat"]):
        for i in range(8):
            suffix = ".jpg" if i % 2 else ".png"
            save_image(root / name / f"img{i}{suffix}", (20 + 3 * i, 16 + 2 * c), seed=10 * c + i)
    return root


@pytest.fixture(scope="session")
def unique_label_shards(tmp_path_factory) -> Path:
    """64 images whose integer label is their own index, written as 8 shards of 8 samples."""
    from data_pipelines.writer import write_shards

    root = tmp_path_factory.mktemp("unique")
    lines = []
    for i in range(64):
        save_image(root / "src" / f"{i:03d}.jpg", (16, 16), seed=1000 + i)
        lines.append(f"src/{i:03d}.jpg,{i}")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    write_shards(root / "list.csv", root / "shards", prefix="u", max_count=8, workers=1)
    return root / "shards"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors on a shared 2-core machine: a second intra-op thread only adds contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> dict[str, Path]:
    """The embedded default data (`lsdr shards sample`): train/val/test shard directories."""
    from data_pipelines.sample import write_sample_shards

    return write_sample_shards(tmp_path_factory.mktemp("sample"))
