"""Built-in synthetic vision data: procedural, deterministic by seed, no files, no downloads.

A scene is 1-5 (``max_shapes``) objects on a dark background, one per cell of a 3 x 3 grid, each a
distinct (colour, shape) pair (4 colours x circle / square / triangle), big or small, with a tiny
digit (3 x 5 pixels at 48 px) stamped on it. Every object is therefore named uniquely by "the
{colour} {shape}".

* Stage 1 (``stage=1``): a DENSE caption listing every object, its size, colour, shape, digit and
  grid cell, compactly ("big red square 7 top left , small blue circle 2 middle centre .").
* Stage 2 (``stage=2``): one question per image, kinds round-robin over :data:`QUESTION_KINDS`:
  the vision-centric kinds where the paper reports its gains (``count`` up to five,
  ``relation`` left/right/above/below, ``size`` bigger/smaller, ``shape``), an OCR-like kind
  (``ocr``: "which digit is on the red square ?") and a knowledge control (``knowledge``: "what colour
  is the grass ?", answerable by a language model that never saw an image).
* :func:`text_samples`: the same scenes as TEXT (the caption in place of the image) with their
  questions, caption copying and the knowledge facts: the text-only pre-training data of the
  miniature's language model, and a text-only held-out set that measures forgetting.
* :func:`scene_batch`: images with global labels (which colour-shape pairs are present, how many
  objects) for pre-training the miniature's vision tower.

Train and held-out splits use disjoint seed streams (:data:`HELDOUT_SEED_OFFSET`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS = tuple(str(i) for i in range(10))
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
VISION_CENTRIC = ("count", "relation", "size", "shape")
QUESTION_KINDS = VISION_CENTRIC + ("ocr", "knowledge")
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]  # the 12 colour-shape pairs (vision pre-training labels)

# Knowledge control: facts a text-only language model learns in pre-training (no image needed).
FACTS: List[Tuple[str, str]] = (
    [(f"what colour is the {thing} ?", colour) for thing, colour in (
        ("grass", "green"), ("leaf", "green"), ("frog", "green"), ("sky", "blue"), ("sea", "blue"),
        ("banana", "yellow"), ("lemon", "yellow"), ("sun", "yellow"), ("cherry", "red"), ("tomato", "red"),
        ("blood", "red"))]
    + [(f"how many corners does a {shape} have ?", n) for shape, n in (
        ("triangle", "three"), ("square", "four"), ("circle", "zero"))]
    + [(f"what number comes after {NUMBERS[i]} ?", NUMBERS[i + 1]) for i in range(9)]
)

WORDS = sorted(set(
    list(COLOURS) + list(SHAPES) + list(SIZES) + list(NUMBERS) + list(DIGITS) + [s + "s" for s in SHAPES]
    + list(ROWS) + list(COLS) + [w for q, a in FACTS for w in q.split() + [a]] + [
        "a", "an", "and", "the", "of", "on", "in", "is", "are", "there", "what", "which", "how", "many",
        "colour", "shape", "shapes", "digit", "image", "describe", "at", "with", "or", "than", "bigger", "smaller",
        "above", "below", "left", "right", "one", "?", ".", ",",
    ]
))

# 3 x 5 bitmaps of the digits (rows top to bottom, '#' = ink)
_FONT = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", ".##", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
}
_BACKGROUND = (20, 20, 28)
_INK = (10, 10, 10)


@dataclass
class Shape:
    kind: str
    colour: str
    size: str
    row: int  # grid cell
    col: int
    digit: str
    cx: float = 0.0  # centre, in [0, 1] (cell centre plus a small jitter)
    cy: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def make_scene(rng: random.Random, max_shapes: int = 5) -> List[Shape]:
    """1..max_shapes objects with distinct (colour, shape) pairs in distinct cells of a 3 x 3 grid."""
    n = rng.randint(1, max(1, min(max_shapes, 9)))
    pairs = rng.sample(PAIRS, n)
    cells = rng.sample(range(9), n)
    shapes = []
    for (colour, kind), cell in zip(pairs, cells):
        row, col = divmod(cell, 3)
        s = Shape(kind, colour, rng.choice(SIZES), row, col, rng.choice(DIGITS))
        s.cx = (col + 0.5 + rng.uniform(-0.06, 0.06)) / 3
        s.cy = (row + 0.5 + rng.uniform(-0.06, 0.06)) / 3
        shapes.append(s)
    return shapes


def render(shapes: List[Shape], size: int, rng: random.Random) -> torch.Tensor:
    """uint8 ``[3, size, size]`` image: anti-aliased shapes, crisp digits, light noise."""
    from PIL import Image, ImageDraw

    scale = 4  # draw large and downsample: anti-aliased edges
    big = size * scale
    img = Image.new("RGB", (big, big), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for s in shapes:
        r = (0.29 if s.size == "small" else 0.45) * cell
        cx, cy = s.cx * big, s.cy * big
        col = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif s.kind == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=col)
        else:
            draw.polygon([(cx, cy - r * 1.05), (cx - r * 1.05, cy + r * 0.85), (cx + r * 1.05, cy + r * 0.85)], fill=col)
    img = img.resize((size, size), Image.BILINEAR)
    px = img.load()
    dscale = max(1, size // 48)  # 3 x 5 pixels at 48 px
    for s in shapes:
        x0 = round(s.cx * size) - (3 * dscale) // 2
        y0 = round(s.cy * size) - (5 * dscale) // 2 + (dscale if s.kind == "triangle" else 0)
        for j, line in enumerate(_FONT[s.digit]):
            for i, ch in enumerate(line):
                if ch == "#":
                    for dy in range(dscale):
                        for dx in range(dscale):
                            x, y = x0 + i * dscale + dx, y0 + j * dscale + dy
                            if 0 <= x < size and 0 <= y < size:
                                px[x, y] = _INK
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    noise = torch.randint(-6, 7, t.shape, generator=gen)
    return (t.to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)


def caption(shapes: List[Shape]) -> str:
    """Dense caption: every object with its size, colour, shape, digit and grid cell, in reading order."""
    parts = [f"{s.size} {s.colour} {s.kind} {s.digit} {ROWS[s.row]} {COLS[s.col]}"
             for s in sorted(shapes, key=lambda s: (s.row, s.col))]
    return " , ".join(parts) + " ."


def questions(shapes: List[Shape], rng: random.Random) -> Dict[str, Tuple[str, str]]:
    """kind -> (question, one-word answer), for every kind the scene answers unambiguously."""
    out = {}
    # count (answers zero..five): all objects, one shape kind, or one colour
    mode = rng.randrange(3)
    if mode == 0:
        out["count"] = ("how many shapes are there ?", NUMBERS[len(shapes)])
    elif mode == 1:
        kind = rng.choice(SHAPES)
        out["count"] = (f"how many {kind}s are there ?", NUMBERS[sum(s.kind == kind for s in shapes)])
    else:
        colour = rng.choice(list(COLOURS))
        out["count"] = (f"how many {colour} shapes are there ?", NUMBERS[sum(s.colour == colour for s in shapes)])
    if len(shapes) >= 2:
        a, b = rng.sample(shapes, 2)
        axes = [ax for ax, differ in (("h", a.col != b.col), ("v", a.row != b.row)) if differ]
        ax = rng.choice(axes)
        if ax == "h":
            out["relation"] = (f"is the {a.name} left or right of the {b.name} ?", "left" if a.col < b.col else "right")
        else:
            out["relation"] = (f"is the {a.name} above or below the {b.name} ?", "above" if a.row < b.row else "below")
        diff = [(x, y) for x in shapes for y in shapes if x.size != y.size]
        if diff:
            x, y = rng.choice(diff)
            out["size"] = (f"is the {x.name} bigger or smaller than the {y.name} ?",
                           "bigger" if x.size == "big" else "smaller")
    colours = [s.colour for s in shapes]
    uniq = [s for s in shapes if colours.count(s.colour) == 1]
    if uniq:
        s = rng.choice(uniq)
        out["shape"] = (f"what shape is the {s.colour} one ?", s.kind)
    s = rng.choice(shapes)
    out["ocr"] = (f"which digit is on the {s.name} ?", s.digit)
    out["knowledge"] = rng.choice(FACTS)
    return out


def _scene(seed: int, i: int, max_shapes: int):
    rng = random.Random(seed * 1_000_003 + i)
    return rng, make_scene(rng, max_shapes)


def synthetic_samples(num: int, seed: int, stage: int, image_size: int, max_shapes: int = 5,
                      kinds=QUESTION_KINDS) -> List[dict]:
    """``num`` samples: dicts with ``image`` (uint8 tensor), ``conversations`` (LLaVA style), ``kind``, ``answer``.

    Stage 1: a dense caption per image. Stage 2: one question per image, ``kinds`` round-robin (the
    scene is redrawn until it answers the kind: ``size`` needs two sizes, ``shape`` a unique colour).
    """
    samples = []
    for i in range(num):
        rng, shapes = _scene(seed, i, max_shapes)
        if stage == 1:
            image = render(shapes, image_size, rng)
            cap = caption(shapes)
            conv = [{"from": "human", "value": "<image>\ndescribe the image ."}, {"from": "gpt", "value": cap}]
            samples.append({"image": image, "conversations": conv, "kind": "caption", "answer": cap})
            continue
        kind = kinds[i % len(kinds)]
        for attempt in range(1, 50):  # redraw the scene until it answers this kind (balanced kinds)
            qs = questions(shapes, rng)
            if kind in qs:
                break
            rng, shapes = _scene(seed, i + attempt * 10_000_019, max_shapes)
        kind = kind if kind in qs else next(k for k in kinds if k in qs)
        image = render(shapes, image_size, rng)
        q, a = qs[kind]
        conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
        samples.append({"image": image, "conversations": conv, "kind": kind, "answer": a})
    return samples


def text_samples(num: int, seed: int, max_shapes: int = 5, copy_share: float = 0.1,
                 kinds=QUESTION_KINDS) -> List[dict]:
    """Text-only samples (no image): the scene's caption stands where the image would be.

    A ``copy_share`` of them ask to "describe the image" (answer: the caption, copied from the
    context); the rest ask a question of ``kinds`` round-robin (``knowledge`` facts half of the time
    with a scene before them, half without). Kinds as in :func:`synthetic_samples`, plus ``copy``.
    """
    samples = []
    for i in range(num):
        rng, shapes = _scene(seed, i, max_shapes)
        cap = caption(shapes)
        if rng.random() < copy_share:
            kind, q, a = "copy", "describe the image .", cap
        else:
            qs = questions(shapes, rng)
            for j in range(len(kinds)):
                kind = kinds[(i + j) % len(kinds)]
                if kind in qs:
                    break
            q, a = qs[kind]
        user = q if kind == "knowledge" and rng.random() < 0.5 else f"{cap}\n{q}"
        samples.append({"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": a}],
                        "kind": kind, "answer": a})
    return samples


def scene_batch(num: int, seed: int, image_size: int, max_shapes: int = 5):
    """``(images uint8 [num, 3, S, S], pairs float [num, 12], counts long [num])`` for vision pre-training:
    which colour-shape pairs are present (multi-label) and how many objects (0-based class: n - 1)."""
    images, pairs, counts = [], torch.zeros(num, len(PAIRS)), torch.zeros(num, dtype=torch.long)
    for i in range(num):
        rng, shapes = _scene(seed, i, max_shapes)
        images.append(render(shapes, image_size, rng))
        for s in shapes:
            pairs[i, PAIRS.index((s.colour, s.kind))] = 1.0
        counts[i] = len(shapes) - 1
    return torch.stack(images), pairs, counts


TRAIN_SEED_OFFSET = 0
HELDOUT_SEED_OFFSET = 7_777_777  # disjoint seed stream for the held-out split
