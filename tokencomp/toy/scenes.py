"""Procedural visual question answering: coloured shapes on a 3x3 grid, one-word answers.

Everything is deterministic by seed (numpy ``default_rng``). A scene is a ``SIZE x SIZE`` RGB image
with 2-5 shapes, each in its own cell of a 3x3 grid (jittered, random size; each shape kind
with its own fill texture, see ``_FILL``), plus grey clutter specks. Questions ask about a small part of the image:

* ``what colour is the <shape> ?``      -> a colour        (the shape is unique in the scene)
* ``is there a <colour> <shape> ?``      -> yes / no        (balanced)
* ``how many <shape>s ?``                -> one / two / three
* ``where is the <shape> ?``             -> left / right / top / bottom (the shape sits in the
  middle-left / middle-right / top-middle / bottom-middle cell)
* ``which shape is <colour> ?``          -> a shape         (the colour is unique in the scene)

Each :class:`Question` carries the ground-truth mask of the asked-about object(s) (for "how many",
all objects of that shape; for a "no" answer, the objects of the asked shape, possibly none).

Splits: ``"train"`` and ``"test"`` draw scenes from disjoint seed ranges, so the held-out test
questions never share a scene with training (``make_questions("test", n)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SIZE",
    "SHAPES",
    "COLOURS",
    "KINDS",
    "Obj",
    "Scene",
    "Question",
    "make_scene",
    "scene_questions",
    "make_questions",
    "vocabulary",
]

SIZE = 96  #: image side in pixels
CELL = SIZE // 3  #: grid cell side
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "purple": (160, 60, 200),
    "white": (245, 245, 245),
}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
PLACES = {(1, 0): "left", (1, 2): "right", (0, 1): "top", (2, 1): "bottom"}  # (row, col) -> word
KINDS = ("colour", "exists", "count", "where", "which")

_TEST_OFFSET = 1_000_000_007  # test scenes use seeds from here on; train seeds stay below


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    row: int
    col: int
    cy: float
    cx: float
    r: float


@dataclass
class Scene:
    image: np.ndarray  #: (SIZE, SIZE, 3) uint8
    objects: list
    masks: list  #: one (SIZE, SIZE) bool mask per object
    seed: int = 0


@dataclass
class Question:
    image: np.ndarray = field(repr=False)
    question: str
    answer: str
    kind: str
    mask: np.ndarray = field(repr=False)  #: (SIZE, SIZE) bool, the asked-about object(s)
    seed: int = 0


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def _shape_mask(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = _YY - cy, _XX - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(dy) <= s) & (np.abs(dx) <= s)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r * 1.1
    if shape == "triangle":  # pointing up, base at cy + r*0.8
        top, bottom = cy - r, cy + r * 0.8
        frac = (_YY - top) / (bottom - top)
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
    if shape == "cross":
        w = r * 0.35
        return ((np.abs(dy) <= r) & (np.abs(dx) <= w)) | ((np.abs(dx) <= r) & (np.abs(dy) <= w))
    raise ValueError(shape)


# Each shape kind has its own fill texture (brightness 1.0 / 0.5 with a 6 px period aligned to the
# 6 px vision patches), so that every patch inside an object says which kind it is. Without it the
# toy vision tower could not learn shapes from silhouettes of 3-4 patches on a CPU budget (measured:
# ~35% per-patch shape accuracy after 500 steps with plain fills). Hue is preserved.
_YI, _XI = np.mgrid[0:SIZE, 0:SIZE] % 6 < 3


def _fill(on: np.ndarray) -> np.ndarray:
    return np.where(on, 1.0, 0.5).astype(np.float32)


_FILL = {
    "circle": np.ones((SIZE, SIZE), np.float32),
    "square": _fill(_YI),
    "triangle": _fill(_XI),
    "diamond": _fill(_YI ^ _XI),
    "cross": _fill(_YI | _XI),
}


def make_scene(seed: int) -> Scene:
    """The scene of `seed` (any non-negative int): 2-5 objects in distinct grid cells."""
    rng = np.random.default_rng(seed)
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = rng.integers(20, 70)  # dark background, random grey level
    img += rng.normal(0, 6, size=(SIZE, SIZE, 1))
    # clutter: a few small grey specks
    for _ in range(rng.integers(2, 7)):
        y, x = rng.integers(0, SIZE - 3, size=2)
        s = rng.integers(2, 4)
        img[y : y + s, x : x + s] = rng.integers(90, 140)
    n = int(rng.integers(2, 6))
    cells = rng.permutation(9)[:n]
    # a small palette of shapes per scene so that repeats (for counting) are common
    palette = rng.permutation(len(SHAPES))[: int(rng.integers(2, 4))]
    colours = list(COLOURS)
    objects, masks = [], []
    for c in cells:
        row, col = divmod(int(c), 3)
        shape = SHAPES[int(rng.choice(palette))]
        colour = colours[int(rng.integers(len(colours)))]
        r = float(rng.uniform(7.0, 12.5))
        j = CELL / 2 - r - 1
        cy = row * CELL + CELL / 2 + float(rng.uniform(-j, j)) * 0.6
        cx = col * CELL + CELL / 2 + float(rng.uniform(-j, j)) * 0.6
        m = _shape_mask(shape, cy, cx, r)
        shade = np.asarray(COLOURS[colour], np.float32) * float(rng.uniform(0.85, 1.0))
        img[m] = shade * _FILL[shape][m, None]
        objects.append(Obj(shape, colour, row, col, cy, cx, r))
        masks.append(m)
    return Scene(np.clip(img, 0, 255).astype(np.uint8), objects, masks, seed)


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def scene_questions(scene: Scene, rng: np.random.Generator) -> list:
    """Every askable question of `scene`, in a random order (one per kind at most, balanced yes/no)."""
    objs, masks = scene.objects, scene.masks
    empty = np.zeros((SIZE, SIZE), bool)

    def union(idx):
        out = empty.copy()
        for i in idx:
            out |= masks[i]
        return out

    by_shape = {s: [i for i, o in enumerate(objs) if o.shape == s] for s in SHAPES}
    by_colour = {c: [i for i, o in enumerate(objs) if o.colour == c] for c in COLOURS}
    out = []
    unique_shapes = [s for s in SHAPES if len(by_shape[s]) == 1]
    if unique_shapes:
        s = unique_shapes[int(rng.integers(len(unique_shapes)))]
        i = by_shape[s][0]
        out.append(("colour", f"what colour is the {s} ?", objs[i].colour, masks[i]))
    # exists: yes or no with equal probability
    if rng.random() < 0.5:
        i = int(rng.integers(len(objs)))
        o = objs[i]
        idx = [k for k, p in enumerate(objs) if p.shape == o.shape and p.colour == o.colour]
        out.append(("exists", f"is there a {o.colour} {o.shape} ?", "yes", union(idx)))
    else:
        present = {(o.shape, o.colour) for o in objs}
        for _ in range(50):
            s = SHAPES[int(rng.integers(len(SHAPES)))]
            c = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            # prefer hard negatives: the shape or the colour is present
            hard = bool(by_shape[s]) or bool(by_colour[c])
            if (s, c) not in present and (hard or rng.random() < 0.2):
                out.append(("exists", f"is there a {c} {s} ?", "no", union(by_shape[s])))
                break
    present_shapes = [s for s in SHAPES if by_shape[s]]
    s = present_shapes[int(rng.integers(len(present_shapes)))]
    if len(by_shape[s]) <= 3:
        out.append(("count", f"how many {_plural(s)} ?", NUMBERS[len(by_shape[s])], union(by_shape[s])))
    placed = [s for s in unique_shapes if (objs[by_shape[s][0]].row, objs[by_shape[s][0]].col) in PLACES]
    if placed:
        s = placed[int(rng.integers(len(placed)))]
        i = by_shape[s][0]
        out.append(("where", f"where is the {s} ?", PLACES[(objs[i].row, objs[i].col)], masks[i]))
    unique_colours = [c for c in COLOURS if len(by_colour[c]) == 1]
    if unique_colours:
        c = unique_colours[int(rng.integers(len(unique_colours)))]
        i = by_colour[c][0]
        out.append(("which", f"which shape is {c} ?", objs[i].shape, masks[i]))
    order = rng.permutation(len(out))
    return [out[k] for k in order]


def make_questions(split: str, n: int, seed: int = 0, per_scene: int = 1) -> list:
    """`n` questions of `split` ("train" or "test"), deterministic in (`split`, `n`, `seed`).

    Scenes are drawn one after the other from the split's seed range; each contributes up to
    `per_scene` of its questions. Kinds are cycled so that every kind is equally represented.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = (_TEST_OFFSET if split == "test" else 0) + seed * 100_003
    out, k, want = [], 0, 0
    while len(out) < n:
        sd = base + k
        k += 1
        scene = make_scene(sd)
        qs = scene_questions(scene, np.random.default_rng([sd, 1]))
        # cycle kinds: take the wanted kind first if the scene has it
        qs.sort(key=lambda q: q[0] != KINDS[want % len(KINDS)])
        for kind, text, ans, mask in qs[:per_scene]:
            if kind == KINDS[want % len(KINDS)]:
                want += 1
            out.append(Question(scene.image, text, ans, kind, mask, sd))
            if len(out) == n:
                break
    return out


def vocabulary() -> list:
    """Every word a question or an answer can contain (the tokenizer's vocabulary)."""
    words = "what colour is the there a how many where which shape ?".split()
    words += list(SHAPES) + [_plural(s) for s in SHAPES] + list(COLOURS) + list(NUMBERS)
    words += ["yes", "no"] + list(PLACES.values())
    return list(dict.fromkeys(words))
