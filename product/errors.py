"""The product layer's checks and its one place for errors: what a user can get wrong, and what a machine can do to
a run (a full disk, Ctrl-C, too little memory), each said in one line that names the file or flag and what to do.

Every CLI's main() runs through `cli`. Our own checks raise ValueError / FileNotFoundError with a finished message;
the readers in product/files.py turn decoding errors into such messages naming their file. Anything else unexpected is a
bug, not a user error: it keeps its traceback.
"""
import errno
import math
import signal
import sys

import torch
from safetensors import SafetensorError

from product import signals

ADVICE = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
          errno.EROFS: "the file system is read-only: choose a writable output",
          errno.EACCES: "choose an output you may write to", errno.EPERM: "choose an output you may write to",
          errno.EEXIST: "it is in the way: choose another output or remove it",
          errno.ENOTDIR: "a file is in the way of a folder: choose another output",
          errno.EISDIR: "a folder is in the way of a file: choose another output"}
FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)  # the machine's fault, not the command's: run it again after


def cli(main, *, memory_hint="", next_command=None, quiet=False):
    """Run `main()`; exit with one line for the errors a user (or the machine) causes: 1, or 128 + the signal's
    number for Ctrl-C (130) and SIGTERM (143), which stop it with no partial file left (product/signals.py).

    memory_hint: the flags that reduce this tool's memory. next_command(): what to run after a fault (Ctrl-C, a
    full disk), e.g. train.py's "--resume continues from checkpoint-40"; default: the same command again.
    quiet: exit with the code but print nothing (torchrun's other ranks: rank 0 says it once)."""
    with signals.handled():  # up to the exit: a SIGTERM repeated during a stop (torchrun's, say) cannot cut it short
        return _cli(main, memory_hint, next_command, quiet)


def _cli(main, memory_hint, next_command, quiet):
    def again():
        return next_command() if next_command else "run the same command again"
    try:
        return main()
    except KeyboardInterrupt as e:  # Ctrl-C, or signals.Signalled (SIGTERM; train.py: after its checkpoint)
        signum = getattr(e, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        message, code = f"{what}; {again()}", 128 + signum
    except ValueError as e:  # ours, finished (UnicodeDecode/JSONDecode are ValueErrors too, named by product/files.py)
        message, code = f"error: {e}", 1
    except OSError as e:  # ours (FileNotFoundError with a message); disk full, read-only, a file in the way ...
        where = f"{e.filename}: " if e.filename else ""
        advice = "; ".join(a for a in (ADVICE.get(e.errno), again() if e.errno in FAULTS else None) if a)
        message, code = f"error: {where}{e.strerror or e}" + (f"; {advice}" if advice else ""), 1
    except SafetensorError as e:  # a reader that did not go through files.open_safetensors
        message, code = f"error: a .safetensors file is not readable ({e}): it is truncated or corrupted", 1
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        message, code = f"error: out of memory ({first_line(e)}){'; ' + memory_hint if memory_hint else ''}", 1
    # Exit outside the except blocks: the failed call's frames (and the run lock they hold) are freed first.
    message = " ".join(message.split())
    if quiet:
        sys.exit(code)
    if code == 1:
        sys.exit(message)  # printed to stderr, exit status 1
    print(message, file=sys.stderr)
    sys.exit(code)


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def is_out_of_memory(e):
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    text = str(e)
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text or \
        "not enough memory" in text or "out of memory" in text.lower()


SEED_MAX = 2 ** 63 - 1  # seeds are whole numbers that fit torch's generators (and every int64)


def check_flags(values, rules):
    """Every numeric flag against its meaning, before anything is loaded or written: a refusal is one line naming
    the flag. values: {dest: value} (vars(args), a value None = left out, a list = each of its values); rules: {dest:
    range}, the range as the message says it: "> 0", ">= 0", ">= 1", "0 .. 1", "seed" (a whole number 0 .. 2^63-1)
    or "finite" (any sign). Every value must be finite: NaN or inf would train or draw nothing (NaN weights, a black
    image) without an error of its own. A CLI keeps its rules in one table beside its flags (e.g. train_cli.NUMBERS),
    and the tests check that every numeric flag has one."""
    for name, rule in rules.items():
        value = values.get(name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None:
                continue
            flag = "--" + name.replace("_", "-")
            if not math.isfinite(v):
                raise ValueError(f"{flag} {v}: must be a finite number")
            if not in_range(v, rule):
                words = f"a whole number from 0 to 2^63-1 ({SEED_MAX})" if rule == "seed" else rule
                raise ValueError(f"{flag} {v}: must be {words}")


def in_range(v, rule):
    """v within a range of check_flags ("> 0", ">= 1", "0 .. 1", "seed", "finite")."""
    if rule == "finite":
        return True
    if rule == "seed":
        return 0 <= v <= SEED_MAX
    if ".." in rule:
        low, high = (float(x) for x in rule.split(".."))
        return low <= v <= high
    op, bound = rule.split()
    return v > float(bound) if op == ">" else v >= float(bound)


def parse_flags(parser, argv, rules):
    """parser.parse_args(argv) with check_flags(rules); a refusal exits with its one line (status 1). For the
    research CLIs (tinyworld/, benchmarks/), which do not run through cli()."""
    args = parser.parse_args(argv)
    try:
        check_flags(vars(args), rules)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return args


def check_device(name):
    """--device against what exists: a typo, cuda without CUDA, cuda:3 on a one-GPU machine -> ValueError."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {name}: no CUDA GPU is visible to PyTorch here; use --device cpu")
        if device.index is not None and device.index >= n:
            raise ValueError(f"--device {name}: there are only {n} CUDA GPU(s) (cuda:0 .. cuda:{n - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: use cpu, cuda or cuda:N")
    return device
