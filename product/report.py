"""See the run: report.png from log.jsonl, samples/progress.png from the checkpoint samples, and DCO's beta check.

    python -m product.report output/dog      # rebuild both pictures of any run folder, finished or still running

train.py redraws both at every checkpoint and at the end. report.png has four panels, read left to right, top down:
  1. the loss over the steps (grey: each step; black: a moving median);
  2. the implicit reward r = l_phi - l_theta by timestep band (dco.dco_loss; --relative-reward logs r / l_phi);
  3. the share of DCO's gradient left, 2 sigmoid(-beta r), by band: 1 where theta = phi, 0 where the log-sigmoid has
     saturated. DCO's gradient on l_theta is beta sigmoid(-beta r), beta/2 at the start, so this is it relative to
     the start. A band at 0 learns nothing more: at the paper's beta = 1000 the low-noise band, where a subject's
     detail is learned, gets there within the first steps of a tiny-world run;
  4. the learning rates (--lr-warmup, --lr-schedule).
DreamBooth (--loss db, db-prior) has no reward: its panels 2 and 3 show the loss by band instead (batch size 1,
where a step's loss is its one sample's), or say why not.

The beta check (BetaCheck) is the one DCO-specific failure made impossible to miss: when the gradient left in the
low-noise band (t < 500) falls below 10% during the first fifth of the run, train.py prints one line, once, with the
share, the median reward there and the beta that would put beta * r at ln 3 (half the gradient left: 2 sigmoid(-ln 3)
= 1/2). It never stops the run.
"""
import json
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont

from product import plot

BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))  # timestep bands of SDXL's 1000 training steps
LOW_NOISE = 500  # t below: the low-noise steps, where DCO saturates first
THRESHOLD = 0.1  # the beta check warns below 10% of the gradient left there
REPORT, PROGRESS = "report.png", os.path.join("samples", "progress.png")


# ----------------------------------------------------------------------------------------------------------
# Reading a run folder

def read_log(out):
    """log.jsonl's step records. A torn last line (a run cut off while writing it, or one still writing) is skipped,
    as train.py --resume skips it; a bad line before the last is an error naming it."""
    path = os.path.join(out, "log.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; point at a train.py output folder")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            record["step"], record["loss"]
        except (ValueError, KeyError, TypeError):
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not a step record; fix or remove that line") from None
            continue
        records.append(record)
    return records


def read_config(out):
    """train_config.json (beta, loss, relative_reward, learning rates), or {} where there is none yet."""
    path = os.path.join(out, "train_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def samples(record):
    """[(t, reward)] of a step's samples: the per-sample rewards where logged (DCO), else None rewards."""
    rewards = record.get("implicit_rewards") or [None] * len(record["t"])
    return list(zip(record["t"], rewards))


def gradient_left(reward, beta):
    """2 sigmoid(-beta r): DCO's gradient on l_theta, beta sigmoid(-beta r), relative to its start beta/2 (r = 0)."""
    return 2.0 / (1.0 + math.exp(min(beta * reward, 700.0)))


def band_of(t):
    return next(i for i, (lo, hi) in enumerate(BANDS) if t < hi or i == len(BANDS) - 1)


def band_label(i):
    lo, hi = BANDS[i]
    return f"t {lo}-{hi - 1}" + (" (low noise)" if hi <= LOW_NOISE else "")


# ----------------------------------------------------------------------------------------------------------
# The beta check

class BetaCheck:
    """Watches the low-noise band's gradient left during the first fifth of a run; warn() returns the one line, once.
    The share is the mean of 2 sigmoid(-beta r) over the last `window` low-noise samples (one step is too noisy)."""

    def __init__(self, beta, steps, relative=False, window=8):
        self.beta, self.until, self.relative, self.window = beta, max(1, steps // 5), relative, window
        self.recent, self.warned = [], False

    def update(self, step, t, rewards):
        """One step's timesteps and rewards -> the warning line the first time the check fires, else None."""
        if self.warned or rewards is None or step >= self.until:
            return None
        self.recent += [r for ti, r in zip(t, rewards) if ti < LOW_NOISE]
        self.recent = self.recent[-self.window:]
        if len(self.recent) < self.window:
            return None
        share = sum(gradient_left(r, self.beta) for r in self.recent) / len(self.recent)
        if share >= THRESHOLD:
            return None
        self.warned = True
        median = sorted(self.recent)[len(self.recent) // 2]
        what = "relative reward r / l_phi" if self.relative else "reward r = l_phi - l_theta"
        suggest = f"--beta {math.log(3) / median:.3g}" if median > 0 else "a smaller --beta"
        return (f"warning: beta {self.beta:g} has saturated DCO at low noise by step {step + 1}: "
                f"{100 * share:.1f}% of the gradient is left at t < {LOW_NOISE} (median {what} {median:.3g} there); "
                f"{suggest} would leave about half (beta * r = ln 3). See report.png, panel 3")


# ----------------------------------------------------------------------------------------------------------
# report.png

def moving_median(values, window):
    half = window // 2
    return [sorted(values[max(0, i - half):i + half + 1])[len(values[max(0, i - half):i + half + 1]) // 2]
            for i in range(len(values))]


def binned(points, bins=60):
    """[(step, value)] -> at most `bins` points: the mean step and median value of each run of consecutive points."""
    if len(points) <= bins:
        return points
    size = len(points) / bins
    out = []
    for k in range(bins):
        chunk = points[int(k * size):int((k + 1) * size)]
        if chunk:
            values = sorted(v for _, v in chunk)
            out.append((sum(s for s, _ in chunk) / len(chunk), values[len(values) // 2]))
    return out


def by_band(records, value):
    """[[(step, value(t, reward))] per band] over every logged sample."""
    out = [[] for _ in BANDS]
    for rec in records:
        for t, r in samples(rec):
            out[band_of(t)].append((rec["step"] + 1, value(t, r, rec)))
    return out


def message_panel(text, size):
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, size[0] - 1, size[1] - 1], outline=(200, 200, 200))
    d.multiline_text((size[0] / 2, size[1] / 2), text, fill="black", font=ImageFont.load_default(size=13),
                     anchor="mm", align="center")
    return img


def band_series(bands, dots=False):
    return [plot.Series(band_label(i), binned(pts), color=plot.PALETTE[i], dots=dots) for i, pts in enumerate(bands)
            if pts]


NO_GRADIENT = "DCO's gradient left, 2 sigmoid(-beta r):\nnot defined for DreamBooth (no reward, no beta)"


def draw_report(records, config, size=(560, 400)):
    """The four panels of a run's log (see the module docstring) as one image."""
    name = config.get("name") or "run"
    if not records:
        return message_panel(f"{name}: no step logged yet", (2 * size[0] + 10, size[1]))
    steps = [r["step"] + 1 for r in records]
    losses = [r["loss"] for r in records]
    window = max(1, len(losses) // 25)
    loss = plot.lines([plot.Series("loss per step", list(zip(steps, losses)), color=(190, 190, 190), dots=False),
                       plot.Series(f"moving median ({window} steps)", list(zip(steps, moving_median(losses, window))),
                                   color=(0, 0, 0), dots=False)],
                      "step", "loss", f"{name}: loss ({config.get('loss', '?')})", size)
    beta = float(config.get("beta") or 0)
    relative = bool(config.get("relative_reward"))
    if any("implicit_rewards" in r for r in records) and beta:
        what = "r / l_phi" if relative else "r = l_phi - l_theta"
        reward = plot.lines(band_series(by_band(records, lambda t, r, rec: r)), "step", f"implicit reward {what}",
                            "implicit reward by timestep band (median of bins)", size)
        bands = by_band(records, lambda t, r, rec: gradient_left(r, beta))
        left = plot.lines(band_series(bands) + [plot.Series(f"{THRESHOLD:.0%}: the beta check",
                                                            [(steps[0], THRESHOLD), (steps[-1], THRESHOLD)],
                                                            color=(120, 120, 120), dashed=True, dots=False)],
                          "step", "gradient left, 2 sigmoid(-beta r)", f"DCO's gradient left by band (beta {beta:g})",
                          size, yrange=(-0.03, 1.03))
    elif all(len(r["t"]) == 1 for r in records):  # DreamBooth at batch 1: a step's loss is its one sample's
        bands = by_band(records, lambda t, r, rec: rec["loss"])
        reward = plot.lines(band_series(bands), "step", "loss", "loss by timestep band (no reward: DreamBooth)", size)
        left = message_panel(NO_GRADIENT, size)
    else:
        reward = message_panel("no reward: DreamBooth's loss has none,\nand at batch > 1 a step's loss mixes bands",
                               size)
        left = message_panel(NO_GRADIENT, size)
    lr0 = float(config.get("lr") or 0)
    lrs = [plot.Series("--lr (LoRA)", list(zip(steps, [r["lr"] for r in records])), dots=False)]
    if config.get("tokens") and lr0:  # the token rows' rate follows the same schedule
        ti = float(config.get("ti_lr") or 0)
        lrs.append(plot.Series("--ti-lr (token rows)", [(s, r["lr"] * ti / lr0) for s, r in zip(steps, records)],
                               dots=False))
    rates = plot.lines(lrs, "step", "learning rate", "learning rates", size)
    return plot.grid([[loss, reward], [left, rates]])


# ----------------------------------------------------------------------------------------------------------
# samples/progress.png

def checkpoint_samples(out):
    """{step: [sample image paths in prompt order]} of samples/stepNNNNNN-I.png."""
    folder, found = os.path.join(out, "samples"), {}
    if os.path.isdir(folder):
        for f in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(f)
            if ext == ".png" and stem.startswith("step") and "-" in stem:
                step, _, index = stem[4:].partition("-")
                if step.isdigit() and index.isdigit():
                    found.setdefault(int(step), []).append((int(index), os.path.join(folder, f)))
    return {s: [p for _, p in sorted(v)] for s, v in sorted(found.items())}


def draw_progress(by_step, prompts, cell=160):
    """A row per checkpoint (labelled with its step), a column per sample prompt, the prompts under the columns."""
    font = ImageFont.load_default(size=12)
    cols = max(len(v) for v in by_step.values())
    label_w, text_h = 90, 16 * 4
    img = Image.new("RGB", (label_w + cols * cell, len(by_step) * cell + text_h), "white")
    d = ImageDraw.Draw(img)
    for r, (step, paths) in enumerate(by_step.items()):
        d.text((8, r * cell + cell // 2), f"step {step}", fill="black", font=font, anchor="lm")
        for c, p in enumerate(paths):
            with Image.open(p) as im:
                im = im.convert("RGB")
                k = cell / max(im.size)
                im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))),
                               Image.NEAREST if k >= 2 else Image.LANCZOS)
            img.paste(im, (label_w + c * cell, r * cell))
    for c, prompt in enumerate(prompts[:cols]):
        lines = wrap(prompt, font, cell - 6)[:4]
        d.multiline_text((label_w + c * cell + 3, len(by_step) * cell + 2), "\n".join(lines), fill="black",
                         font=font, spacing=2)
    return img


def wrap(text, font, width):
    lines, line = [], ""
    for word in text.split():
        if line and font.getlength(line + " " + word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def sample_prompts(config):
    """The prompts train.py samples at each checkpoint, as it chooses them."""
    tokens = config.get("tokens") or []
    captions = config.get("captions") or [""]
    return config.get("sample_prompt") or [captions[0] or ""] + [f"a {t} playing saxophone in sticker style"
                                                                for t in tokens[:1]]


# ----------------------------------------------------------------------------------------------------------
# Writing

def write_report(out):
    """report.png and (where there are checkpoint samples) samples/progress.png, each written atomically.
    The same log draws the same pictures: nothing in them depends on the time or the machine."""
    from product.files import save_image
    config = read_config(out)
    written = [os.path.join(out, REPORT)]
    save_image(draw_report(read_log(out), config), written[0])
    by_step = checkpoint_samples(out)
    if by_step:
        written.append(os.path.join(out, PROGRESS))
        save_image(draw_progress(by_step, sample_prompts(config)), written[1])
    return written


def main(argv=None):
    import argparse
    from product import errors
    p = argparse.ArgumentParser(description="Rebuild report.png and samples/progress.png of a train.py run folder "
                                            "(finished or still running).")
    p.add_argument("output", nargs="+", help="train.py output folder(s)")
    args = p.parse_args(argv)

    def run():
        for out in args.output:
            if not os.path.isdir(out):
                raise FileNotFoundError(f"{out}: no such folder; point at a train.py output folder")
            print("wrote " + " and ".join(write_report(out)))
    errors.cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])
