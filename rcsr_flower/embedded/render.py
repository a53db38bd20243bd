"""Drawing one item of the embedded corpus: its attributes as a small RGB image.

The pixel side of ``rcsr_flower.embedded.corpus`` (which owns the vocabulary, the captions
and the generation): colours, the 3×3 position grid, object groups drawn supersampled
and box-filtered, textures, and the target/pretrain differences in noise and jitter.
Nothing here may change the bytes it draws without a ``CORPUS_VERSION`` bump there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# the "position" attribute, row by row: render_image places the group on this grid
POSITIONS: tuple[str, ...] = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)

OBJECT_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "cyan": (30, 200, 215),
    "blue": (40, 80, 230),
    "purple": (140, 60, 200),
    "pink": (250, 120, 190),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
    "brown": (115, 75, 40),
    "navy": (25, 35, 95),
}

# Geometry is in pixels of a 64 px image and scales with image_size / 64.

_SUPERSAMPLE = 4  # objects are drawn 4x larger and box-filtered down: anti-aliased edges
_HALF_EXTENT = {"small": 5.0, "medium": 8.0, "large": 11.0}
_ANCHOR = (0.2, 0.5, 0.8)  # left/center/right and top/middle/bottom, fraction of the side
_GAP = 2.5  # px between neighbouring objects of a group
_MARGIN = 1.0  # px kept free at the image border
_TEXTURE_PERIOD = 8.0  # px: stripe period, dot spacing, checker cell
_S3 = math.sqrt(3.0)
_ARRANGEMENTS: dict[int, tuple[tuple[tuple[float, float], ...], ...]] = {
    # offsets in units of the centre distance d; every neighbour pair is d apart
    1: (((0.0, 0.0),),),
    2: (
        ((-0.5, 0.0), (0.5, 0.0)),
        ((0.0, -0.5), (0.0, 0.5)),
        ((-0.3536, -0.3536), (0.3536, 0.3536)),
        ((-0.3536, 0.3536), (0.3536, -0.3536)),
    ),
    3: (
        ((0.0, -1 / _S3), (-0.5, 0.5 / _S3), (0.5, 0.5 / _S3)),
        ((0.0, 1 / _S3), (-0.5, -0.5 / _S3), (0.5, -0.5 / _S3)),
        ((-1.0, 0.0), (0.0, 0.0), (1.0, 0.0)),
        ((0.0, -1.0), (0.0, 0.0), (0.0, 1.0)),
    ),
}


def _regular(n: int, radius: float, start: float) -> np.ndarray:
    angles = start + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius


def _shape_polygon(shape: str, r: float) -> np.ndarray:
    """Vertices (x, y) around the origin, y down, for the polygonal shapes."""
    up = -math.pi / 2
    if shape == "square":
        h = 0.8 * r
        return np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
    if shape == "triangle":
        return _regular(3, r, up) + np.array([0.0, 0.15 * r])  # centre the visual mass
    if shape == "star":
        outer, inner = _regular(5, r, up), _regular(5, 0.42 * r, up + math.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(10, 2)
    if shape == "cross":
        a, w = 0.95 * r, 0.32 * r
        quarter, turn = np.array([(-w, -a), (w, -a), (w, -w)]), np.array([[0.0, 1.0], [-1.0, 0.0]])
        return np.concatenate([quarter @ np.linalg.matrix_power(turn, k) for k in range(4)])
    if shape == "diamond":
        return np.array([(0.0, -r), (0.62 * r, 0.0), (0.0, r), (-0.62 * r, 0.0)])
    if shape == "hexagon":
        return _regular(6, 0.95 * r, up)
    raise ValueError(shape)


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=round(0.38 * r))
    else:
        c, s = math.cos(rot), math.sin(rot)
        pts = _shape_polygon(shape, r) @ np.array([[c, s], [-s, c]]) + (cx, cy)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID_CACHE:
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        _GRID_CACHE[size] = (xs, ys)
    return _GRID_CACHE[size]


def _texture_mask(texture: str, rng: np.random.Generator, size: int, domain: str) -> np.ndarray:
    xs, ys = _grid(size)
    period = _TEXTURE_PERIOD * size / 64
    ox, oy = rng.uniform(0, period, size=2)
    if texture == "striped":
        n_orient = 2 if domain == "pretrain" else 4
        orient = int(rng.integers(n_orient))
        coord = (ys, xs, (xs + ys) / math.sqrt(2), (xs - ys) / math.sqrt(2))[orient]
        return ((coord + ox) % period) < period / 2
    if texture == "dotted":
        dx = (xs + ox) % period - period / 2
        dy = (ys + oy) % period - period / 2
        return dx * dx + dy * dy <= (0.2 * period) ** 2
    if texture == "checkered":
        return ((np.floor((xs + ox) / period) + np.floor((ys + oy) / period)) % 2) == 0
    return np.zeros((size, size), dtype=bool)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grey-level erosion with a square window (separable running minimum)."""
    out = mask
    for axis in (0, 1):
        src, res = out, out.copy()
        for d in range(1, radius + 1):
            a = [slice(None)] * 2
            b = [slice(None)] * 2
            a[axis], b[axis] = slice(d, None), slice(None, -d)
            res[tuple(a)] = np.minimum(res[tuple(a)], src[tuple(b)])
            res[tuple(b)] = np.minimum(res[tuple(b)], src[tuple(a)])
        out = res
    return out


def render_image(
    attrs: dict[str, Any], rng: np.random.Generator, size: int, domain: str
) -> np.ndarray:
    """The RGB image (uint8, size x size x 3) of one attribute combination."""
    target = domain == "target"
    scale = size / 64
    ss = _SUPERSAMPLE
    # background + texture
    bg = np.array(BACKGROUND_RGB[attrs["background"]], np.float32)
    bg += rng.uniform(-8, 8, 3) if target else rng.uniform(-3, 3, 3)
    shade = np.clip(bg + (45.0 if bg.mean() < 110 else -45.0), 0, 255)
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg
    img[_texture_mask(attrs["texture"], rng, size, domain)] = shade
    # object group geometry
    r = _HALF_EXTENT[attrs["size"]] * scale * (rng.uniform(0.9, 1.1) if target else 1.0)
    rot = math.radians(rng.uniform(-15, 15)) if target else 0.0
    dist = 2.15 * r + _GAP * scale
    ext = 1.15 * r  # half-extent incl. rotated corners
    room = size - 2 * _MARGIN * scale
    options = [
        arr
        for arr in _ARRANGEMENTS[attrs["count"]]
        if 2 * (max(abs(o[0]) for o in arr) * dist + ext) <= room
        and 2 * (max(abs(o[1]) for o in arr) * dist + ext) <= room
    ]
    arrangement = options[int(rng.integers(len(options)))]
    row, col = divmod(POSITIONS.index(attrs["position"]), 3)
    centre = []
    for axis, frac in ((0, _ANCHOR[col]), (1, _ANCHOR[row])):
        half = max(abs(o[axis]) for o in arrangement) * dist + ext
        lo, hi = _MARGIN * scale + half, size - _MARGIN * scale - half
        centre.append(min(max(frac * size + rng.uniform(-2, 2) * scale, lo), hi))
    # object mask, drawn supersampled and box-filtered down
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for ox, oy in arrangement:
        cx, cy = (centre[0] + ox * dist) * ss, (centre[1] + oy * dist) * ss
        _draw_object(draw, attrs["shape"], cx, cy, r * ss, rot)

    def down(m: Image.Image) -> np.ndarray:  # box filter to the output size, as alpha in [0, 1]
        return np.asarray(m.reduce(ss), np.float32)[..., None] / 255

    color = np.array(OBJECT_RGB[attrs["color"]], np.float32)
    color = np.clip(color + (rng.uniform(-18, 18, 3) if target else rng.uniform(-5, 5, 3)), 0, 255)
    alpha = down(canvas)
    if target:
        img = img * (1 - alpha) + color * alpha
        img += 5.0 * rng.standard_normal(img.shape, dtype=np.float32)
    else:
        fill = down(Image.fromarray(_erode(np.asarray(canvas), round(1.0 * scale * ss))))
        img = img * (1 - alpha) + color * fill + 0.45 * color * (alpha - fill)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
