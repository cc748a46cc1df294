"""The tiny world: procedural captioned images of one coloured shape on a coloured background.

A scene has five attributes, every one stated by its caption (the "comprehensive captions" DCO trains on):

    a big red circle at the top left on a blue background, flat style
      |    |    |          |                |                |
     size colour kind   position        background         style

6 colours x 4 kinds x 5 positions x 2 sizes (shape colour != background), plus a little jitter of position and
size so no two images are the same. The base model learns this world; the DCO experiments then teach it NEW
concepts drawn by the same code, which it never saw:

  subjects (a particular object, as DreamBooth's "a [V] dog"): the token takes the colour word's place and the
      kind word stays as the class noun, "a big <checker> circle ...". Its init word is the subject's main colour,
      so the base prompt train.py builds ("<checker>" -> "yellow") is an ordinary world caption.
  styles (a rendering of the whole image): the token replaces "flat", "..., <pastel> style"; init word "flat".
      Every base caption ends in "flat style", a phrase that carries no information but makes "X style" a slot the
      base model knows and the style prompt with the init word an ordinary caption again.

Rendering is exact and deterministic: analytic shape masks at 4x supersampling, averaged down (anti-aliased
edges), colours from fixed tables. That is what makes the pixel metrics of metrics.py exact: we drew the images.
Image size: 32x32. Small enough that a UNet trains on 2 CPU cores in minutes, large enough that a 5x5 checker on
a 17-pixel circle, a 1.5-pixel outline and five positions are visible (16x16 was too coarse for the textures).
"""
import os
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

SIZE = 32  # pixels; the tiny SDXL's native resolution

COLORS = {  # >= 110 apart in RGB (>= 55 in the pastel style), so a colour is recognised even in a blurry sample
    "red": (230, 45, 45), "green": (40, 170, 70), "blue": (45, 90, 225),
    "yellow": (245, 215, 50), "purple": (160, 50, 170), "white": (245, 245, 245),
}
KINDS = ("circle", "square", "triangle", "cross")
POSITIONS = {  # the object's centre, as fractions of the image (x right, y down)
    "top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
SIZES = {"small": 0.3, "big": 0.52}  # the object's bounding-box side, as a fraction of the image (~10 / ~17 px)
JITTER_POS, JITTER_SIZE = 0.03, 0.03  # uniform +- jitter of the centre and of the box side (fractions)
EXTRA_COLORS = {"cyan": (60, 215, 215), "pink": (255, 120, 200)}  # only in subjects: never seen by the base model
BLACK = (0, 0, 0)  # only in the outline style
BASE_STYLE = "flat"


@dataclass(frozen=True)
class Subject:
    """A specific object: a kind (its class noun) painted with a two-colour pattern."""
    name: str
    token: str
    kind: str
    pattern: str          # "checker" or "stripes"
    colors: tuple         # colour names (COLORS or EXTRA_COLORS); the first is the init word
    description: str

    @property
    def init_word(self):
        return self.colors[0]


@dataclass(frozen=True)
class Style:
    name: str
    token: str
    description: str
    init_word: str = BASE_STYLE


SUBJECTS = {
    "checker": Subject("checker", "<checker>", "circle", "checker", ("yellow", "cyan"),
                       "a circle painted with a 5x5 checkerboard of yellow and cyan"),
    "striped": Subject("striped", "<striped>", "square", "stripes", ("blue", "pink"),
                       "a square painted with diagonal blue and pink stripes"),
}
STYLES = {
    "pastel": Style("pastel", "<pastel>", "every colour mixed half-and-half with white"),
    "outline": Style("outline", "<outline>", "the shape drawn with a 1.5-pixel black outline"),
}


@dataclass(frozen=True)
class Scene:
    """Everything render() needs. For a subject, `color` and `kind` are the subject's (see make_scene)."""
    bg: str
    color: str
    kind: str
    position: str
    size: str
    style: str = BASE_STYLE
    subject: str | None = None
    dx: float = 0.0  # jitter of the centre and of the box side, fractions of the image
    dy: float = 0.0
    ds: float = 0.0


def rgb(name):
    return COLORS[name] if name in COLORS else EXTRA_COLORS[name]


def make_scene(bg, position, size, color=None, kind=None, style=BASE_STYLE, subject=None, dx=0.0, dy=0.0, ds=0.0):
    """A Scene, checked. With a subject, colour and kind come from it (pass neither)."""
    if subject is not None:
        s = SUBJECTS[subject]
        color, kind = s.init_word, s.kind
    if bg not in COLORS or color not in COLORS or kind not in KINDS or position not in POSITIONS or size not in SIZES:
        raise ValueError(f"make_scene: unknown attribute in bg={bg!r} color={color!r} kind={kind!r} "
                         f"position={position!r} size={size!r}; see world.COLORS/KINDS/POSITIONS/SIZES")
    if style != BASE_STYLE and style not in STYLES:
        raise ValueError(f"make_scene: style {style!r} is not {BASE_STYLE!r} or one of {list(STYLES)}")
    return Scene(bg, color, kind, position, size, style, subject, dx, dy, ds)


def random_scene(rng: np.random.Generator, style=BASE_STYLE, subject=None, jitter=True):
    """A uniformly random scene of the world (the shape's colour differs from the background; a subject's
    colours are never its background, where the subject would vanish)."""
    avoid = set(SUBJECTS[subject].colors) if subject else set()
    bg = rng.choice([c for c in COLORS if c not in avoid])
    color = rng.choice([c for c in COLORS if c != bg])
    kind, position, size = rng.choice(KINDS), rng.choice(list(POSITIONS)), rng.choice(list(SIZES))
    dx, dy, ds = rng.uniform(-1, 1, 3) * (JITTER_POS, JITTER_POS, JITTER_SIZE) if jitter else (0.0, 0.0, 0.0)
    return make_scene(str(bg), str(position), str(size), str(color), str(kind), style, subject,
                      float(dx), float(dy), float(ds))


# ----------------------------------------------------------------------------------------------------------
# Captions


def caption(scene: Scene) -> str:
    """The comprehensive caption: every attribute in a fixed order. Subjects and styles appear as their tokens."""
    what = SUBJECTS[scene.subject].token if scene.subject else scene.color
    style = STYLES[scene.style].token if scene.style in STYLES else scene.style
    where = "the center" if scene.position == "center" else f"the {scene.position}"
    return f"a {scene.size} {what} {scene.kind} at {where} on a {scene.bg} background, {style} style"


def base_caption(scene: Scene) -> str:
    """The caption with every concept token replaced by its init word: what the base model reads (c_base)."""
    return caption(replace(scene, subject=None, style=BASE_STYLE)) if (scene.subject or scene.style != BASE_STYLE) \
        else caption(scene)


def world_words():
    """Every word a caption of the base world can contain (the tokenizer's vocabulary, model.py)."""
    words = {"a", "at", "the", "on", "background", ",", "style", BASE_STYLE}
    words |= set(COLORS) | set(KINDS) | set(SIZES)
    words |= {w for p in POSITIONS for w in p.split()}
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------
# Rendering

SUPERSAMPLE = 4


def shape_mask(kind, lx, ly):
    """Inside test in box coordinates lx, ly in [-1, 1] (x right, y down). Every kind fills its box exactly,
    so the box side is the object's size whatever its kind."""
    inside = (np.abs(lx) <= 1) & (np.abs(ly) <= 1)
    if kind == "circle":
        return lx ** 2 + ly ** 2 <= 1
    if kind == "square":
        return inside
    if kind == "triangle":  # apex at the top centre, base along the bottom
        return inside & (np.abs(lx) <= (ly + 1) / 2)
    if kind == "cross":
        return inside & ((np.abs(lx) <= 1 / 3) | (np.abs(ly) <= 1 / 3))
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")


def pattern_index(pattern, lx, ly):
    """Which of the subject's two colours paints each point. Box coordinates: the pattern scales and moves with
    the object, so it is the same object at every size and place."""
    if pattern == "checker":  # 5 x 5 cells over the box
        return (np.floor((lx + 1) * 2.5) + np.floor((ly + 1) * 2.5)).astype(int) % 2
    if pattern == "stripes":  # bands along the "\" diagonal, 6 across the box
        return np.floor((lx - ly + 2) * 1.5).astype(int) % 2
    raise ValueError(f"unknown pattern {pattern!r}")


def dilate(mask, radius):
    """Binary dilation by a disk of `radius` pixels (shifts of a padded copy; no scipy needed)."""
    r = int(np.ceil(radius))
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    H, W = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= radius * radius:
                out |= padded[r + dy : r + dy + H, r + dx : r + dx + W]
    return out


def pastel(img):
    """The pastel style's colour map: halfway to white."""
    return img * 0.5 + 127.5


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as an uint8 [size, size, 3] RGB array; a pure function of the scene."""
    n = size * SUPERSAMPLE
    u = (np.arange(n) + 0.5) / n
    X, Y = np.meshgrid(u, u)
    cx, cy = POSITIONS[scene.position]
    half = (SIZES[scene.size] + scene.ds) / 2
    lx, ly = (X - cx - scene.dx) / half, (Y - cy - scene.dy) / half
    mask = shape_mask(scene.kind, lx, ly)
    img = np.empty((n, n, 3))
    img[:] = COLORS[scene.bg]
    if scene.subject:
        s = SUBJECTS[scene.subject]
        paint = np.array([rgb(c) for c in s.colors], dtype=float)[pattern_index(s.pattern, lx, ly)]
        img[mask] = paint[mask]
    else:
        img[mask] = COLORS[scene.color]
    if scene.style == "outline":
        img[dilate(mask, 1.5 * SUPERSAMPLE) & ~mask] = BLACK
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))  # box filter: anti-aliasing
    if scene.style == "pastel":
        img = pastel(img)
    return np.round(img).clip(0, 255).astype(np.uint8)


def render_pil(scene: Scene, size: int = SIZE) -> Image.Image:
    return Image.fromarray(render(scene, size))


def dataset(n: int, seed: int, size: int = SIZE):
    """n random base-world (image uint8 [n, size, size, 3], captions) pairs, a pure function of the seed."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return np.stack([render(s, size) for s in scenes]), [caption(s) for s in scenes], scenes


# ----------------------------------------------------------------------------------------------------------
# The new concepts: reference images with comprehensive captions, in the kohya layout train.py reads

CONCEPT_SEED = 1234
N_REFERENCE = 5


def concept(name):
    if name in SUBJECTS:
        return SUBJECTS[name]
    if name in STYLES:
        return STYLES[name]
    raise ValueError(f"unknown concept {name!r}; subjects {list(SUBJECTS)}, styles {list(STYLES)}")


def concept_scene(name, rng, jitter=True):
    """A random scene showing concept `name` (a subject in a random context, or a random scene in a style)."""
    if name in SUBJECTS:
        return random_scene(rng, subject=name, jitter=jitter)
    concept(name)
    return random_scene(rng, style=name, jitter=jitter)


def reference_scenes(name, n=N_REFERENCE, seed=CONCEPT_SEED):
    """The concept's n reference scenes: big and small in turn, each on another background (and, for a style,
    another kind of shape while kinds last), so that the concept is the one thing they share. Deterministic."""
    rng = np.random.default_rng([seed, sorted([*SUBJECTS, *STYLES]).index(name)])
    scenes = []
    while len(scenes) < n:
        s = concept_scene(name, rng)
        bgs, kinds = {t.bg for t in scenes}, {t.kind for t in scenes}
        if (s.bg not in bgs or len(bgs) >= 5) and (name in SUBJECTS or s.kind not in kinds or len(kinds) == len(KINDS)):
            scenes.append(replace(s, size=("big", "small")[len(scenes) % 2]))
    return scenes


def write_concept(name, folder, n=N_REFERENCE, seed=CONCEPT_SEED):
    """Write image_k.png + image_k.txt (its caption, with the concept's token) for k < n into folder."""
    os.makedirs(folder, exist_ok=True)
    for k, s in enumerate(reference_scenes(name, n, seed)):
        render_pil(s).save(os.path.join(folder, f"image_{k}.png"))
        with open(os.path.join(folder, f"image_{k}.txt"), "w") as f:
            f.write(caption(s) + "\n")
    return folder


CONCEPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "concepts")

if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Write the new concepts' reference images and captions.")
    p.add_argument("--output", default=CONCEPTS_DIR, help="one folder per concept is written here")
    args = p.parse_args()
    for name in [*SUBJECTS, *STYLES]:
        c = concept(name)
        print(f"{write_concept(name, os.path.join(args.output, name))}: token {c.token}, init word {c.init_word}")
