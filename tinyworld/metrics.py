"""Ground-truth metrics of the tiny world, computed from pixels: the roles of the paper's DINO and CLIP/SigLIP scores.

We drew every image, so instead of a learned embedding we can *read* a generated image back into the world's
attributes and compare:

  parse(image)             background colour, the object's mask, colour, kind, position and size
  prompt_fidelity(image, scene)   does the image obey the prompt? one 0/1 per attribute the prompt states
                           ("bg", "color", "kind", "position", "size"; for a subject prompt only the context
                           attributes bg/position/size, since its colour and kind ARE the subject), their mean
                           ("overall") and whether all are right ("all").              ~ the paper's SigLIP score
  subject_fidelity(image, subject)  how much the object is the subject, in [0, 1]: the mean of    ~ DINO score
                           shape   1 if the object's kind is the subject's (a circle for <checker>),
                           colors  where the object's pixels lie between the subject's two colours (near one, near
                                   the other, mixed), intersected with the same histogram of the subject,
                           texture 1 - relative L1 distance of the object's directional total variation (mean colour
                                   change to the neighbour right, down and on both diagonals) to the subject's: it
                                   tells a checker from stripes, and stripes from stripes twice as fine, and is
                                   unchanged by a mild blur (the VAE's), which only spreads each edge out.
                           References are the subject drawn at the detected size, so a perfect drawing scores ~0.9,
                           a plain yellow circle ~0.5 (right kind, one of two colours, no texture), others ~0.1.
  style_fidelity(image, style)  in [0, 1]: pastel = share of (non-white) pixels whose nearest world colour is a
                           pastel one; outline = share of the object's edge pixels with a dark pixel (a black line,
                           blurred or not) within 2 pixels outside.

Colours are recognised as the nearest world colour *or its pastel version*, so a pastel image still reads as
"red circle on blue"; black pixels (an outline) are never part of the object. Parsing is exact on rendered
scenes (tests) and tolerant of the blur and colour drift of samples: the background is the median of the
image border, the object the largest connected region far from it.
"""
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import world

DARK = 80          # max(r, g, b) below this is black (the outline style); no world colour comes close
OUTLINE_DARK = 105  # ... and below this a blurred black line still counts as one (mixes of world colours: >= 120)
CHANGE = 40        # colours further apart than this (RGB distance) are different: world colours are >= 55 apart
NAMES = list(world.COLORS) + list(world.EXTRA_COLORS)
_RGB = np.array([world.rgb(c) for c in NAMES], dtype=float)
PALETTE = np.concatenate([_RGB, world.pastel(_RGB)])      # every colour a world image can contain, plain + pastel
PALETTE_NAMES = NAMES + NAMES
IS_PASTEL = np.array([False] * len(NAMES) + [True] * len(NAMES))
WORLD = np.array([n in world.COLORS for n in PALETTE_NAMES])  # the base world's own colours


def nearest(pixels, allowed=None):
    """Index into PALETTE of the nearest colour of each RGB pixel [..., 3] (among `allowed` entries, if given)."""
    d = np.linalg.norm(pixels[..., None, :].astype(float) - PALETTE, axis=-1)
    if allowed is not None:
        d[..., ~allowed] = np.inf
    return d.argmin(-1)


def color_name(rgb, allowed=WORLD):
    return PALETTE_NAMES[int(nearest(np.asarray(rgb, dtype=float), allowed))]


def largest_component(mask):
    """The largest 4-connected region of a boolean mask (a flood fill; images are 32x32)."""
    seen, best = np.zeros_like(mask), np.zeros_like(mask)
    H, W = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        comp, stack = [], [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > best.sum():
            best = np.zeros_like(mask)
            best[tuple(np.array(comp).T)] = True
    return best


def kind_template(kind, box, shape):
    """Which pixels a `kind` filling the box (x0, y0, x1, y1 in pixels, exclusive ends) covers at least half of."""
    H, W = shape
    s = world.SUPERSAMPLE
    x0, y0, x1, y1 = box
    u = (np.arange(W * s) + 0.5) / s
    v = (np.arange(H * s) + 0.5) / s
    X, Y = np.meshgrid(u, v)
    m = world.shape_mask(kind, (X - (x0 + x1) / 2) / ((x1 - x0) / 2), (Y - (y0 + y1) / 2) / ((y1 - y0) / 2))
    return m.reshape(H, s, W, s).mean(axis=(1, 3)) >= 0.5


@dataclass
class Parsed:
    bg: str
    found: bool              # an object was seen at all
    mask: np.ndarray         # [H, W] bool: the object (without a black outline)
    color: str | None = None
    kind: str | None = None
    position: str | None = None
    size: str | None = None
    extent: float = 0.0      # bounding-box side, fraction of the image
    center: tuple = (0.0, 0.0)
    kind_iou: float = 0.0


def parse(image) -> Parsed:
    """Read an image (uint8/float [H, W, 3], 0..255, or a PIL image) back into the world's attributes."""
    img = np.asarray(image, dtype=float)[..., :3]
    H, W, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    bg = color_name(bg_rgb)
    dist = np.linalg.norm(img - bg_rgb, axis=-1)
    dark = img.max(-1) < DARK
    rough = largest_component((dist > CHANGE) & ~dark)
    if rough.sum() < 4:
        return Parsed(bg, False, rough)
    # Half-way between background and object: the contour an anti-aliased edge would have.
    mask = largest_component((dist > 0.5 * np.median(dist[rough])) & ~dark)
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    cx, cy = (box[0] + box[2]) / 2 / W, (box[1] + box[3]) / 2 / H
    extent = max(box[2] - box[0], box[3] - box[1]) / W
    position = min(world.POSITIONS, key=lambda p: np.hypot(cx - world.POSITIONS[p][0], cy - world.POSITIONS[p][1]))
    size = "small" if extent < np.sqrt(world.SIZES["small"] * world.SIZES["big"]) else "big"
    ious = {}
    for kind in world.KINDS:
        t = kind_template(kind, box, (H, W))
        ious[kind] = (t & mask).sum() / max(1, (t | mask).sum())
    kind = max(ious, key=ious.get)
    color = color_name(np.median(img[mask], axis=0))
    return Parsed(bg, True, mask, color, kind, position, size, extent, (cx, cy), ious[kind])


PROMPT_ATTRIBUTES = ("bg", "color", "kind", "position", "size")


def prompt_fidelity(image, scene: world.Scene) -> dict:
    """{attribute: 1.0 if the image shows what the prompt (scene) says else 0.0, ..., "overall": their mean,
    "all": 1.0 if every one is right}. A subject prompt is judged on bg, position and size only."""
    p = parse(image)
    attrs = ("bg", "position", "size") if scene.subject else PROMPT_ATTRIBUTES
    res = {a: float(getattr(p, a) == getattr(scene, a)) for a in attrs}
    res["overall"] = float(np.mean(list(res.values())))
    res["all"] = float(res["overall"] == 1.0)
    return res


# ----------------------------------------------------------------------------------------------------------
# Subjects


def subject_colors(subject, style):
    """RGB of the subject's two colours [2, 3] as drawn in `style`."""
    rgb = np.array([world.rgb(c) for c in world.SUBJECTS[subject].colors], dtype=float)
    return world.pastel(rgb) if style == "pastel" else rgb


def texture_signature(img, mask, scale):
    """Directional total variation inside the object: the mean colour difference |p - q| between a pixel and its
    neighbour right, down, down-right and down-left (pairs inside the object, 1 pixel in from its edge, so the
    outline does not count), divided by `scale` (the distance of the subject's two colours). A blur spreads an
    edge over more pairs but keeps their sum, so the signature survives the VAE's softening; a solid object's is 0."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    H, W = mask.shape
    sig = []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = (slice(0, H - dy), slice(max(0, -dx), W - max(0, dx)))
        b = (slice(dy, H), slice(max(0, dx), W - max(0, -dx)))
        both = inner[a] & inner[b]
        sig.append(np.linalg.norm(img[a] - img[b], axis=-1)[both].sum() / max(1, both.sum()) / scale)
    return np.array(sig)


def color_histogram(img, mask, colors):
    """Where the object's pixels lie on the segment between the subject's two colours: shares near the first
    colour, in between (the two mixed, e.g. by blur), near the second; pixels further than CHANGE from the
    segment count in none. A plain object of the first colour puts everything in the first bin."""
    p = img[mask]
    c0, c1 = colors
    t = np.clip((p - c0) @ (c1 - c0) / ((c1 - c0) @ (c1 - c0)), 0, 1)
    on = np.linalg.norm(p - (c0 + t[:, None] * (c1 - c0)), axis=-1) < CHANGE
    return np.array([(on & (t < 1 / 3)).mean(), (on & (t >= 1 / 3) & (t <= 2 / 3)).mean(), (on & (t > 2 / 3)).mean()])


@lru_cache(maxsize=256)
def _subject_reference(subject, style, extent_px):
    """The subject drawn at the centre at a given box size: its colour histogram and texture signature."""
    s = world.SUBJECTS[subject]
    bg = max(world.COLORS, key=lambda c: min(np.linalg.norm(np.subtract(world.COLORS[c], world.rgb(k))) for k in s.colors))
    scene = world.make_scene(bg, "center", "big", subject=subject, style=style,
                             ds=extent_px / world.SIZE - world.SIZES["big"])
    img = world.render(scene).astype(float)
    p, colors = parse(img), subject_colors(subject, style)
    return color_histogram(img, p.mask, colors), texture_signature(img, p.mask, np.linalg.norm(colors[1] - colors[0]))


def subject_fidelity(image, subject: str, style: str = world.BASE_STYLE) -> dict:
    """{"shape", "colors", "texture", "overall"} in [0, 1]: how much the image's object is `subject` (drawn in
    `style`, for a subject + style composition). See the module docstring."""
    s = world.SUBJECTS[subject]
    img = np.asarray(image, dtype=float)[..., :3]
    p = parse(img)
    if not p.found:
        return {"shape": 0.0, "colors": 0.0, "texture": 0.0, "overall": 0.0}
    ref_hist, ref_sig = _subject_reference(subject, style, int(round(p.extent * world.SIZE)))
    colors = subject_colors(subject, style)
    sig = texture_signature(img, p.mask, np.linalg.norm(colors[1] - colors[0]))
    res = {
        "shape": float(p.kind == s.kind),
        "colors": float(np.minimum(color_histogram(img, p.mask, colors), ref_hist).sum() / max(1e-8, ref_hist.sum())),
        "texture": float(max(0.0, 1 - np.abs(sig - ref_sig).sum() / max(1e-8, ref_sig.sum()))),
    }
    res["overall"] = float(np.mean(list(res.values())))
    return res


# ----------------------------------------------------------------------------------------------------------
# Styles


def style_fidelity(image, style: str) -> float:
    """In [0, 1]: how much the image is drawn in `style`. See the module docstring."""
    img = np.asarray(image, dtype=float)[..., :3]
    if style == "pastel":
        keep = img.max(-1) >= DARK
        idx = nearest(img[keep])
        counted = np.array(PALETTE_NAMES)[idx] != "white"  # white's pastel version is white
        return float(IS_PASTEL[idx][counted].mean()) if counted.any() else 0.0
    if style == "outline":
        p = parse(img)
        if not p.found:
            return 0.0
        edge = p.mask & world.dilate(~p.mask, 1)  # the object's own outermost pixels
        line = world.dilate((img.max(-1) < OUTLINE_DARK) & ~p.mask, 2)  # within 2 px of a dark pixel outside it
        return float(line[edge].mean())
    raise ValueError(f"style_fidelity: unknown style {style!r}; one of {list(world.STYLES)}")


def mean_scores(rows):
    """[{name: score}] -> {name: mean score}."""
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}
