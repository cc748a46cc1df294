"""Line-and-point plots drawn with PIL (no matplotlib): a run's report.png (product/report.py) and the tiny world's
Pareto and merge plots (tinyworld/experiments.py).

    img = plot.lines([plot.Series("DCO", [(0.8, 0.6), (0.7, 0.7)], labels=["1", "2"])],
                     xlabel="prompt fidelity", ylabel="subject fidelity", title="subjects")
    plot.side_by_side([img, img2]).save("pareto.png")

A series is a polyline with a dot per point, an optional text beside each point (the w_con of that point) and an
optional error bar per point (the spread over seeds, +- in y and x).
"""
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # matplotlib's tab10


@dataclass
class Series:
    name: str
    points: list                                  # [(x, y)]
    labels: list = field(default_factory=list)    # text beside each point ("" for none)
    errors: list = field(default_factory=list)    # [(dx, dy)] half-widths of the error bars
    color: tuple | None = None
    dashed: bool = False
    dots: bool = True                             # False: a curve (a training log's thousand points)


def nice_range(values, pad=0.05):
    lo, hi = min(values), max(values)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    span = hi - lo
    return lo - pad * span, hi + pad * span


def ticks(lo, hi, n=5):
    """About n round tick values in [lo, hi]."""
    raw = (hi - lo) / n
    step = min((s * 10 ** e for e in range(-3, 3) for s in (1, 2, 2.5, 5) if s * 10 ** e >= raw), default=raw)
    first = -(-lo // step) * step
    return [round(first + i * step, 6) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _dashed_line(draw, a, b, fill, width, dash=6):
    (x0, y0), (x1, y1) = a, b
    length = max(1.0, ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5)
    for s in range(0, int(length), 2 * dash):
        t0, t1 = s / length, min(1.0, (s + dash) / length)
        draw.line([(x0 + t0 * (x1 - x0), y0 + t0 * (y1 - y0)), (x0 + t1 * (x1 - x0), y0 + t1 * (y1 - y0))],
                  fill=fill, width=width)


def lines(series, xlabel="", ylabel="", title="", size=(560, 440), xrange=None, yrange=None, font_size=13):
    """One panel: axes with ticks and a grid, every series as dots joined by a line, a legend top left."""
    W, H = size
    font = ImageFont.load_default(size=font_size)
    small = ImageFont.load_default(size=font_size - 3)
    left, right, top, bottom = 62, 16, 34, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    spans = [(p, e) for sr in series for p, e in zip(sr.points, sr.errors or [None] * len(sr.points))]
    xs = [x + s * (e[0] if e else 0) for (x, _), e in spans for s in (-1, 1)]
    ys = [y + s * (e[1] if e else 0) for (_, y), e in spans for s in (-1, 1)]
    x0, x1 = xrange or nice_range(xs)
    y0, y1 = yrange or nice_range(ys)
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)  # noqa: E731
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)  # noqa: E731
    for t in ticks(x0, x1):
        d.line([(px(t), top), (px(t), H - bottom)], fill=(232, 232, 232))
        d.text((px(t), H - bottom + 4), f"{t:g}", fill="black", font=small, anchor="mt")
    for t in ticks(y0, y1):
        d.line([(left, py(t)), (W - right, py(t))], fill=(232, 232, 232))
        d.text((left - 5, py(t)), f"{t:g}", fill="black", font=small, anchor="rm")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text(((left + W - right) / 2, H - 8), xlabel, fill="black", font=font, anchor="md")
    d.text(((left + W - right) / 2, 8), title, fill="black", font=font, anchor="mt")
    label = Image.new("RGB", (H - top - bottom, font_size + 6), "white")  # the y label, rotated
    ImageDraw.Draw(label).text((label.width / 2, 2), ylabel, fill="black", font=font, anchor="mt")
    img.paste(label.rotate(90, expand=True), (4, top))
    for i, sr in enumerate(series):
        color = sr.color or PALETTE[i % len(PALETTE)]
        pts = [(px(x), py(y)) for x, y in sr.points]
        for a, b in zip(pts, pts[1:]):
            _dashed_line(d, a, b, color, 2) if sr.dashed else d.line([a, b], fill=color, width=2)
        for (x, y), e in zip(sr.points, sr.errors):
            if e:
                d.line([(px(x - e[0]), py(y)), (px(x + e[0]), py(y))], fill=color, width=1)
                d.line([(px(x), py(y - e[1])), (px(x), py(y + e[1]))], fill=color, width=1)
        for (x, y), text in zip(pts if sr.dots else [], sr.labels or [""] * len(pts)):
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color, outline="black")
            if text:
                d.text((x + 6, y - 6), text, fill=color, font=small, anchor="ls")
        ly = top + 8 + i * (font_size + 4)
        d.line([(left + 8, ly), (left + 26, ly)], fill=color, width=3)
        d.text((left + 32, ly), sr.name, fill="black", font=small, anchor="lm")
    return img


def side_by_side(images, gap=10):
    W = sum(im.width for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (W, max(im.height for im in images)), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def grid(rows, gap=10):
    """Rows of panels -> one image (each row side by side, the rows stacked)."""
    strips = [side_by_side(r, gap) for r in rows]
    out = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips) + gap * (len(strips) - 1)),
                    "white")
    y = 0
    for s in strips:
        out.paste(s, (0, y))
        y += s.height + gap
    return out


def labelled_rows(rows, labels, font_size=12):
    """Rows of equal-size images, each row's label in a column on the left (as wide as the longest label)."""
    font = ImageFont.load_default(size=font_size)
    w, h = rows[0][0].size
    pad = int(max(font.getlength(t) for t in labels)) + 12
    out = Image.new("RGB", (pad + w * max(map(len, rows)), h * len(rows)), "white")
    d = ImageDraw.Draw(out)
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c, im in enumerate(row):
            out.paste(im, (pad + c * w, r * h))
        d.text((6, r * h + h // 2), label, fill="black", font=font, anchor="lm")
    return out
