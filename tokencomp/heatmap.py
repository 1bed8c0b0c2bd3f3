"""Pictures of which vision tokens survived each stage, drawn over the original image.

Written without image libraries: a PNG encoder of a few lines (zlib + CRC) keeps the demo free of
optional dependencies.
"""

from __future__ import annotations

import struct
import zlib
from typing import Sequence

import torch


def demo_picture(size: int) -> torch.Tensor:
    """A deterministic, real-looking ``(3, size, size)`` picture in [0, 1]: sky, sun, hills, a house."""
    y = torch.linspace(0, 1, size)[:, None].expand(size, size)
    x = torch.linspace(0, 1, size)[None, :].expand(size, size)
    img = torch.stack([0.35 + 0.3 * y, 0.55 + 0.25 * y, 0.95 - 0.2 * y])  # sky gradient
    sun = ((x - 0.78) ** 2 + (y - 0.2) ** 2) < 0.01
    img[:, sun] = torch.tensor([1.0, 0.85, 0.2])[:, None]
    hill = y > 0.62 + 0.08 * torch.sin(x * 7.0)
    img[:, hill] = torch.stack([0.2 + 0.1 * x[hill], 0.55 - 0.15 * y[hill], 0.2 + 0 * x[hill]])
    wall = (x > 0.2) & (x < 0.45) & (y > 0.5) & (y < 0.75)
    img[:, wall] = torch.tensor([0.85, 0.8, 0.7])[:, None]
    roof = (y > 0.35) & (y <= 0.5) & ((x - 0.325).abs() < (y - 0.35) * 1.0)
    img[:, roof] = torch.tensor([0.7, 0.2, 0.15])[:, None]
    door = (x > 0.3) & (x < 0.35) & (y > 0.63) & (y < 0.75)
    img[:, door] = torch.tensor([0.35, 0.2, 0.1])[:, None]
    return img.clamp(0, 1)


def kept_grid(grid: tuple[int, int], start: int, positions: torch.Tensor) -> torch.Tensor:
    """``(rows, cols)`` bool map of the kept tokens of one image whose tokens start at ``start`` and
    fill a row-major ``grid``."""
    rows, cols = grid
    out = torch.zeros(rows * cols, dtype=torch.bool)
    local = positions.long() - start
    local = local[(local >= 0) & (local < rows * cols)]
    out[local] = True
    return out.view(rows, cols)


def overlay(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Dim the patches of ``image`` (3, H, W) whose cell in ``keep`` (rows, cols) is False."""
    H, W = image.shape[1:]
    cell = torch.nn.functional.interpolate(keep[None, None].float(), size=(H, W), mode="nearest")[0, 0].bool()
    out = image.clone()
    out[:, ~cell] = out[:, ~cell] * 0.2 + 0.05
    return out


def render_kept(image: torch.Tensor, grid, start: int, kept_positions: dict, sample: int = 0) -> torch.Tensor:
    """The image, then one dimmed copy per stage showing the tokens kept there, side by side."""
    panels = [image]
    for layer in sorted(kept_positions):
        panels.append(overlay(image, kept_grid(grid, start, kept_positions[layer][sample])))
    gap = torch.ones(3, image.shape[1], 4)
    row = []
    for p in panels:
        row += [p, gap]
    return torch.cat(row[:-1], dim=2)


def write_png(path, image: torch.Tensor) -> None:
    """Write a ``(3, H, W)`` float image in [0, 1] as an 8-bit RGB PNG."""
    data = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    H, W = data.shape[:2]
    raw = b"".join(b"\x00" + bytes(data[r].flatten().tolist()) for r in range(H))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def qwen_grids(grid_thw: torch.Tensor, merge: int) -> Sequence[tuple[int, int, int]]:
    """Token grids ``(frames, rows, cols)`` of Qwen images/videos from their patch grids."""
    return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]
