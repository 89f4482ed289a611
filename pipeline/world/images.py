"""Eight procedurally generated image classification tasks, written as Hugging Face
publishes image datasets (parquet shards with `image` = {bytes, path} and `label`).

Every image is drawn at 64 px, then downsampled and noised, so a small ViT can learn each
task well but not trivially. An image has one of two looks. The *web* look (random
backgrounds, colours and a little clutter) is what pretraining mostly sees. Each task's
benchmark split has its own *domain* (`LOOKS`: MNIST-like white strokes on black, small
print on paper, small far-away objects...). Real CLIP is weak on MNIST or EuroSAT because their
images look unlike web photos, not because it never read the class names, and this world
is weak zero-shot for the same reason. Label spaces are disjoint: no class name appears in
two tasks.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from cache.files import atomic_path

CANVAS = 64
COLOURS = {  # name -> RGB centre; the colours task jitters around these
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 225, 40), "green": (40, 170, 50),
    "cyan": (40, 215, 225), "blue": (35, 60, 215), "purple": (135, 45, 190), "pink": (250, 130, 190),
    "brown": (120, 70, 30), "gray": (128, 128, 128),
}
DIRECTIONS = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0), "up left": (-1, -1),
              "up right": (1, -1), "down left": (-1, 1), "down right": (1, 1)}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CELLS = ["top left", "top center", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom center", "bottom right"]

TASKS = {
    "digits": (NUMBER_WORDS, ["a photo of the digit {}.", "the number {} written on a picture.",
                              "a picture of a handwritten {}."]),
    "letters": ([f"letter {c}" for c in "abcdefghij"], ["a photo of the {}.", "the {} written in a picture.",
                                                         "a picture showing a capital {}."]),
    "shapes": (["circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "crescent"],
               ["a photo of a {}.", "a drawing of a {} shape.", "a {} on a background."]),
    "colors": (list(COLOURS), ["a photo of something {} coloured.", "a {} blob.", "the colour {}."]),
    "textures": (["horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots",
                  "grid lines", "waves", "speckles"],
                 ["a photo of a {} texture.", "a surface covered in {}.", "a pattern of {}."]),
    "counts": (["one dot", "two dots", "three dots", "four dots", "five dots", "six dots", "seven dots",
                "eight dots"], ["a picture with {}.", "a photo of {} on a background."]),
    "arrows": (list(DIRECTIONS), ["an arrow pointing {}.", "a photo of an arrow that points {}."]),
    "positions": (CELLS, ["an object in the {} of the picture.", "a photo with a mark at the {}."]),
}
TASK_NAMES = tuple(TASKS)

# How "the web" describes these images in pretraining captions when it does not use the
# task's own class names: other words for the same classes (numerals for digits, NATO
# letters, compass points...). Image features learn the classes from them, while the
# zero-shot prompts, built from the class names, align with them only weakly.
ALIASES = {
    "digits": ([str(i) for i in range(10)], ["a sign showing {}.", "the symbol {} on a picture."]),
    "letters": (["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"],
                ["the glyph {}.", "a sign that reads {}."]),
    "shapes": (["ball", "box", "wedge", "asterisk", "plus", "honeycomb", "rhombus", "moon"],
               ["a {} outline.", "something like a {}."]),
    "colors": (["crimson", "amber", "lemon", "emerald", "turquoise", "navy", "violet", "rose", "chocolate",
                "silver"], ["a {} spot.", "paint in {}."]),
    "textures": (["rows", "columns", "slants", "chessboard", "spots", "mesh", "ripples", "grain"],
                 ["fabric with {}.", "a surface of {}."]),
    "counts": ([f"{i} spots" for i in range(1, 9)], ["exactly {}.", "a card with {}."]),
    "arrows": (["north", "south", "west", "east", "northwest", "northeast", "southwest", "southeast"],
               ["a sign heading {}.", "a pointer to the {}."]),
    "positions": (["upper left", "upper middle", "upper right", "left side", "middle", "right side",
                   "lower left", "lower middle", "lower right"], ["a mark on the {}.", "a dot placed {}."]),
}


@dataclass(frozen=True)
class Look:
    """How images are drawn: the web's look (the defaults) or a task's benchmark domain."""
    about: str = "web: random backgrounds and colours"
    background: str = "web"          # web (solid, gradient or blotches) | dark | paper | noise
    ink: str = "contrast"            # contrast (any colour far from the background) | white | black
    scale: tuple[float, float] = (1.0, 1.0)  # the picture shrunk by this and placed at random on its background
    rotate: float = 0.0              # at most this many degrees either way
    blur: float = 0.0
    gray: bool = False
    invert: bool = False


WEB = Look()
LOOKS = {  # each task's benchmark domain; none moves a class into another (no rotation for arrows' diagonals...)
    "digits": Look("white strokes on black, gray and tilted (MNIST)", background="dark", ink="white", rotate=20,
                   blur=0.6, gray=True),
    "letters": Look("small dark print on paper (a scan)", background="paper", ink="black", scale=(0.6, 0.8),
                    blur=0.6),
    "shapes": Look("inverted colours on sensor noise", background="noise", invert=True),
    "colors": Look("small swatches seen from far away (aerial)", background="noise", scale=(0.4, 0.6)),
    "textures": Look("tilted and soft", rotate=12, blur=0.7),
    "counts": Look("small black dots on paper", background="paper", ink="black", scale=(0.7, 0.8)),
    "arrows": Look("small signs on noise (street view)", background="noise", scale=(0.6, 0.8), rotate=8),
    "positions": Look("bright blurred marks on dark noise (a night camera)", background="noise", ink="black",
                      invert=True, blur=0.8),
}


def _check(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: the miniature world has {', '.join(TASK_NAMES)}")


def classnames(task: str) -> list[str]:
    _check(task)
    return list(TASKS[task][0])


def templates(task: str) -> list[str]:
    _check(task)
    return list(TASKS[task][1])


def aliases(task: str) -> tuple[list[str], list[str]]:
    """(other names for the classes, caption templates using them) for pretraining captions."""
    _check(task)
    names, tpls = ALIASES[task]
    return list(names), list(tpls)


def _colour(rng, avoid=None, min_dist=120) -> tuple[int, int, int]:
    for _ in range(20):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        if avoid is None or np.abs(np.subtract(c, avoid)).sum() > min_dist:
            return c
    return tuple(255 - v for v in avoid)


def _background(rng, look: Look = WEB, base=None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A background in the look's style (around `base`, the colour of one drawn already)."""
    if look.background in ("dark", "paper", "noise"):
        if base is None:
            base = {"dark": rng.uniform(0, 40, 3), "noise": rng.uniform(60, 190, 3),
                    "paper": np.array([235, 228, 210]) + rng.uniform(-15, 15, 3)}[look.background]
        base = np.asarray(base, np.float32)
        img = np.broadcast_to(base, (CANVAS, CANVAS, 3))
        if look.background == "noise":
            img = np.clip(base + rng.normal(0, 45, (CANVAS, CANVAS, 3)), 0, 255)
        return img.astype(np.float32), tuple(int(v) for v in base)
    kind = rng.integers(3)
    base = np.array(_colour(rng), dtype=np.float32)
    if kind == 0:
        img = np.broadcast_to(base, (CANVAS, CANVAS, 3)).copy()
    elif kind == 1:
        other = np.array(_colour(rng), dtype=np.float32)
        t = np.linspace(0, 1, CANVAS, dtype=np.float32)
        ramp = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        img = base * (1 - ramp) + other * ramp + np.zeros((CANVAS, CANVAS, 1), np.float32)
    else:
        coarse = rng.normal(0, 40, (8, 8, 3)).astype(np.float32)
        img = base + np.kron(coarse, np.ones((8, 8, 1), np.float32))
    return np.clip(img, 0, 255), tuple(int(v) for v in base)


def _clutter(draw: ImageDraw.ImageDraw, rng, n: int) -> None:
    for _ in range(n):
        x, y = rng.integers(0, CANVAS, 2)
        dx, dy = rng.integers(-8, 9, 2)
        draw.line([(x, y), (x + dx, y + dy)], fill=_colour(rng), width=1)


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n, radius, offset=0.0):
        return [(cx + radius * math.cos(rot + offset + 2 * math.pi * i / n),
                 cy + radius * math.sin(rot + offset + 2 * math.pi * i / n)) for i in range(n)]
    if kind == "square":
        return ring(4, r, math.pi / 4)
    if kind == "triangle":
        return ring(3, r, -math.pi / 2)
    if kind == "hexagon":
        return ring(6, r)
    if kind == "diamond":
        pts = ring(4, r)
        return [(cx + (x - cx) * 0.6, y) for x, y in pts]
    if kind == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, r * 0.42, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if kind == "cross":
        w = r * 0.38
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(kind)


def _shape(draw, kind, cx, cy, r, rot, fill, bg):
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        off = r * 0.55
        draw.ellipse([cx - r + off * math.cos(rot), cy - r + off * math.sin(rot),
                      cx + r + off * math.cos(rot), cy + r + off * math.sin(rot)], fill=bg)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rot), fill=fill)


def _arrow(draw, direction, cx, cy, length, fill, rng):
    dx, dy = DIRECTIONS[direction]
    norm = math.hypot(dx, dy)
    ux, uy = dx / norm, dy / norm
    px, py = -uy, ux
    tail = (cx - ux * length / 2, cy - uy * length / 2)
    tip = (cx + ux * length / 2, cy + uy * length / 2)
    draw.line([tail, tip], fill=fill, width=int(rng.integers(3, 6)))
    head = length * 0.4
    draw.polygon([tip, (tip[0] - ux * head + px * head * 0.6, tip[1] - uy * head + py * head * 0.6),
                  (tip[0] - ux * head - px * head * 0.6, tip[1] - uy * head - py * head * 0.6)], fill=fill)


def _texture(label: int, rng) -> np.ndarray:
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    if np.abs(a - b).sum() < 150:
        b = 255 - a
    y, x = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    period = rng.uniform(6, 12)
    phase = rng.uniform(0, period)
    name = TASKS["textures"][0][label]
    if name == "horizontal stripes":
        mask = ((y + phase) % period) < period / 2
    elif name == "vertical stripes":
        mask = ((x + phase) % period) < period / 2
    elif name == "diagonal stripes":
        sign = 1 if rng.random() < 0.5 else -1
        mask = ((x + sign * y + phase) % period) < period / 2
    elif name == "checkerboard":
        mask = (((x + phase) // (period / 2)) + ((y + phase) // (period / 2))) % 2 == 0
    elif name == "polka dots":
        mask = (((x + phase) % period - period / 2) ** 2 + ((y + phase) % period - period / 2) ** 2) < (period / 4) ** 2
    elif name == "grid lines":
        mask = (((x + phase) % period) < 1.5) | (((y + phase) % period) < 1.5)
    elif name == "waves":
        mask = ((y + 3 * np.sin(x / period * 2 * np.pi) + phase) % period) < period / 2
    else:  # speckles
        mask = rng.random((CANVAS, CANVAS)) < 0.25
    return np.where(mask[..., None], a, b)


def _ink(rng, look: Look, bg) -> tuple[int, int, int]:
    if look.ink == "white":
        return tuple(int(v) for v in rng.uniform(215, 255, 3))
    if look.ink == "black":
        return tuple(int(v) for v in rng.uniform(0, 50, 3))
    return _colour(rng, avoid=bg, min_dist=200)


def _restyle(img: Image.Image, look: Look, rng, bg) -> Image.Image:
    """A drawn picture in the look's domain: rotated, shrunk onto its background, blurred, toned."""
    if look.rotate:
        img = img.rotate(rng.uniform(-look.rotate, look.rotate), resample=Image.Resampling.BILINEAR, fillcolor=bg)
    if look.scale != (1.0, 1.0):
        side = int(CANVAS * rng.uniform(*look.scale))
        base = Image.fromarray(_background(rng, look, bg)[0].astype(np.uint8))
        x, y = rng.integers(0, CANVAS - side + 1, 2)
        base.paste(img.resize((side, side), Image.Resampling.BOX), (int(x), int(y)))
        img = base
    if look.blur:
        img = img.filter(ImageFilter.GaussianBlur(look.blur))
    if look.gray:
        img = ImageOps.autocontrast(ImageOps.grayscale(img), cutoff=1).convert("RGB")
    if look.invert:
        img = ImageOps.invert(img)
    return img


def render(task: str, label: int, rng: np.random.Generator, size: int = 32, noise: float = 8.0,
           clutter: int = 3, look: Look = WEB) -> np.ndarray:
    """One image of `task` with class `label` in `look` (the web's, or `LOOKS[task]`), as uint8
    (size, size, 3); `noise` is the pixel noise std and `clutter` the most random marks drawn
    over the background."""
    _check(task)
    names = TASKS[task][0]
    if not 0 <= label < len(names):
        raise ValueError(f"label {label} out of range for task {task!r} ({len(names)} classes)")
    if task == "textures":
        canvas = _texture(label, rng)
        bg = tuple(int(v) for v in canvas.reshape(-1, 3).mean(0))
    else:
        canvas, bg = _background(rng, look)
    img = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if look.background == "web":
        _clutter(draw, rng, int(rng.integers(0, clutter + 1)))
    fg = _ink(rng, look, bg)
    jx, jy = rng.uniform(-6, 6, 2)
    cx, cy = CANVAS / 2 + jx, CANVAS / 2 + jy
    if task in ("digits", "letters"):
        glyph = str(label) if task == "digits" else "ABCDEFGHIJ"[label]
        font = ImageFont.load_default(size=int(rng.integers(34, 46)))
        draw.text((cx, cy), glyph, fill=fg, font=font, anchor="mm")
    elif task == "shapes":
        _shape(draw, names[label], cx, cy, rng.uniform(14, 22), rng.uniform(0, 2 * math.pi), fg, bg)
    elif task == "colors":
        rgb = np.clip(np.array(COLOURS[names[label]]) + rng.integers(-18, 19, 3), 0, 255)
        r = rng.uniform(14, 22)
        draw.ellipse([cx - r, cy - r * rng.uniform(0.6, 1.0), cx + r, cy + r], fill=tuple(int(v) for v in rgb))
    elif task == "counts":
        placed = []
        while len(placed) < label + 1:
            p = rng.uniform(7, CANVAS - 7, 2)
            if all(np.hypot(*(p - q)) > 11 for q in placed):
                placed.append(p)
        for x, y in placed:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=fg)
    elif task == "arrows":
        _arrow(draw, names[label], cx, cy, rng.uniform(30, 44), fg, rng)
    elif task == "positions":
        row, col = divmod(label, 3)
        px = (col + 0.5) * CANVAS / 3 + rng.uniform(-4, 4)
        py = (row + 0.5) * CANVAS / 3 + rng.uniform(-4, 4)
        _shape(draw, ["circle", "square", "triangle", "star"][int(rng.integers(4))], px, py, rng.uniform(7, 10),
               rng.uniform(0, 2 * math.pi), fg, bg)
    if look != WEB:
        img = _restyle(img, look, rng, bg)
    small = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    return np.clip(small + rng.normal(0, noise, small.shape), 0, 255).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_split(path: Path, task: str, split: str, n: int, size: int, seed: int, style: dict) -> None:
    index = TASK_NAMES.index(task)
    rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
    labels = rng.permutation(np.arange(n) % len(TASKS[task][0]))
    images = [{"bytes": _png(render(task, int(y), rng, size, **style, look=LOOKS[task])),
               "path": f"{split}/{i:06d}.png"} for i, y in enumerate(labels)]
    table = pa.table({"image": pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(labels, type=pa.int64())})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def web_images(task: str, n: int, *, in_domain: float, size: int = 32, seed: int = 0, noise: float = 8.0,
               clutter: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` pretraining images of `task`'s classes as the web shows them: the web look, and a
    share `in_domain` in the task's benchmark look. (uint8 images (n, size, size, 3), labels,
    which are in the benchmark look.)"""
    _check(task)
    rng = np.random.default_rng([seed, TASK_NAMES.index(task), 2])
    labels = rng.permutation(np.arange(n) % len(TASKS[task][0]))
    looks = rng.random(n) < in_domain
    pictures = [render(task, int(y), rng, size, noise, clutter, LOOKS[task] if d else WEB)
                for y, d in zip(labels, looks)]
    return np.stack(pictures), labels, looks


def write_task(root: Path, task: str, *, n_train: int, n_test: int, size: int = 32, seed: int = 0,
               noise: float = 8.0, clutter: int = 3) -> Path:
    """Write one task's train and test shards and its task.json under root/task."""
    _check(task)
    out = Path(root) / task
    for split, n in (("train", n_train), ("test", n_test)):
        _write_split(out / "data" / f"{split}-00000-of-00001.parquet", task, split, n, size, seed,
                     {"noise": noise, "clutter": clutter})
    meta = {"name": task, "classnames": classnames(task), "templates": templates(task),
            "aliases": aliases(task)[0], "alias_templates": aliases(task)[1], "image_size": size,
            "n_train": n_train, "n_test": n_test, "seed": seed, "noise": noise, "clutter": clutter,
            "domain": LOOKS[task].about}
    (out / "task.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out
