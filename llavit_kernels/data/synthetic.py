"""Built-in synthetic vision data: procedural, deterministic by seed, no files, no downloads.

Every scene is 1-3 (``max_shapes``) coloured shapes (circle, square, triangle) of two sizes at random positions on
a dark background. Stage 1 gets captions ("a big red circle on the left ..."); stage 2 gets
questions that need fine-grained vision: the colour of a named shape, the shape of a named colour,
how many shapes of a kind, and whether one shape is left or right of another. Train and held-out
splits use disjoint seed streams, so held-out images are never seen in training.
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
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_KINDS = ("colour", "shape", "count", "relation")

WORDS = sorted(set(
    list(COLOURS) + list(SHAPES) + list(SIZES) + list(NUMBERS) + [s + "s" for s in SHAPES] + [
        "a", "an", "and", "the", "of", "on", "in", "is", "are", "there", "what", "which", "how", "many",
        "colour", "shape", "left", "right", "top", "bottom", "middle", "image", "picture", "describe",
        "shows", "one", "?", ".", ",", "or", "to", "it",
    ]
))

# region words for captions, by thirds of the image
_H_REGION = ("left", "middle", "right")


@dataclass
class Shape:
    kind: str
    colour: str
    size: str
    cx: float  # centre, in [0, 1]
    cy: float


def make_scene(rng: random.Random, max_shapes: int = 3) -> List[Shape]:
    """Shapes with distinct horizontal positions (so left/right questions are well defined)."""
    n = rng.randint(1, max_shapes)
    shapes: List[Shape] = []
    xs = sorted(rng.sample(range(n * 3), n))  # well separated slots
    for i in range(n):
        cx = (xs[i] + 0.5) / (n * 3) * 0.8 + 0.1
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), cx, rng.uniform(0.25, 0.75)))
    rng.shuffle(shapes)
    return shapes


def render(shapes: List[Shape], size: int, rng: random.Random) -> torch.Tensor:
    """uint8 ``[3, size, size]`` image (drawn with PIL, plus light noise)."""
    from PIL import Image, ImageDraw

    scale = 4  # draw large and downsample: anti-aliased edges
    big = size * scale
    img = Image.new("RGB", (big, big), (20, 20, 28))
    draw = ImageDraw.Draw(img)
    for s in shapes:
        r = (0.09 if s.size == "small" else 0.16) * big
        cx, cy = s.cx * big, s.cy * big
        col = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif s.kind == "square":
            draw.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=col)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=col)
    img = img.resize((size, size), Image.BILINEAR)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    noise = torch.randint(-8, 9, t.shape, generator=gen)
    return (t.to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)


def caption(shapes: List[Shape]) -> str:
    parts = []
    for s in sorted(shapes, key=lambda s: s.cx):
        region = _H_REGION[min(2, int(s.cx * 3))]
        where = "in the middle" if region == "middle" else f"on the {region}"
        parts.append(f"a {s.size} {s.colour} {s.kind} {where}")
    return " , ".join(parts) + " ."


def questions(shapes: List[Shape], rng: random.Random) -> List[Tuple[str, str, str]]:
    """(kind, question, one-word answer) that the scene answers unambiguously."""
    out = []
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    for s in shapes:
        if kinds.count(s.kind) == 1:
            out.append(("colour", f"what colour is the {s.kind} ?", s.colour))
        if colours.count(s.colour) == 1:
            out.append(("shape", f"what shape is the {s.colour} one ?", s.kind))
    kind = rng.choice(SHAPES)
    out.append(("count", f"how many {kind}s are there ?", NUMBERS[kinds.count(kind)]))
    uniq = [s for s in shapes if colours.count(s.colour) == 1]
    if len(uniq) >= 2:
        a, b = rng.sample(uniq, 2)
        out.append(("relation", f"is the {a.colour} shape left or right of the {b.colour} shape ?",
                    "left" if a.cx < b.cx else "right"))
    return out


def synthetic_samples(num: int, seed: int, stage: int, image_size: int, max_shapes: int = 3) -> List[dict]:
    """``num`` samples: dicts with ``image`` (uint8 tensor), ``conversations`` (LLaVA style), ``kind``, ``answer``.

    Stage 1: a caption per image. Stage 2: one question per image, kinds balanced round-robin
    (relation questions fall back to another kind when the scene has none).
    """
    samples = []
    for i in range(num):
        rng = random.Random(seed * 1_000_003 + i)
        shapes = make_scene(rng, max_shapes)
        image = render(shapes, image_size, rng)
        if stage == 1:
            conv = [{"from": "human", "value": "<image>\ndescribe the image ."},
                    {"from": "gpt", "value": caption(shapes)}]
            samples.append({"image": image, "conversations": conv, "kind": "caption", "answer": caption(shapes)})
            continue
        qs = questions(shapes, rng)
        want = QUESTION_KINDS[i % len(QUESTION_KINDS)]
        pick = [q for q in qs if q[0] == want] or qs
        kind, q, a = rng.choice(pick)
        conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
        samples.append({"image": image, "conversations": conv, "kind": kind, "answer": a})
    return samples


TRAIN_SEED_OFFSET = 0
HELDOUT_SEED_OFFSET = 7_777_777  # disjoint seed stream for the held-out split
