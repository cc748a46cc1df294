"""The product layer's checks and its one place for errors: what a user can get wrong, and what a machine can do to
a run (a full disk, Ctrl-C, too little memory), each said in one line that names the file or flag and what to do.

Every CLI's main() runs through `cli`. Our own checks raise ValueError / FileNotFoundError with a finished message;
the readers in product/files.py turn decoding errors into such messages naming their file. Anything else unexpected is a
bug, not a user error: it keeps its traceback.
"""
import errno
import math
import sys

import torch
from safetensors import SafetensorError

ADVICE = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
          errno.EROFS: "the file system is read-only: choose a writable output",
          errno.EACCES: "choose an output you may write to", errno.EPERM: "choose an output you may write to",
          errno.EEXIST: "it is in the way: choose another output or remove it",
          errno.ENOTDIR: "a file is in the way of a folder: choose another output",
          errno.EISDIR: "a folder is in the way of a file: choose another output"}
FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)  # the machine's fault, not the command's: run it again after


def cli(main, *, memory_hint="", next_command=None, quiet=False):
    """Run `main()`; exit with one line for the errors a user (or the machine) causes: 1, or 130 for Ctrl-C.

    memory_hint: the flags that reduce this tool's memory. next_command(): what to run after a fault (Ctrl-C, a
    full disk), e.g. train.py's "--resume continues from checkpoint-40"; default: the same command again.
    quiet: exit with the code but print nothing (torchrun's other ranks: rank 0 says it once)."""
    def again():
        return next_command() if next_command else "run the same command again"
    try:
        return main()
    except KeyboardInterrupt:
        message, code = f"interrupted; {again()}", 130
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


def check_numbers(**values):
    """Guidance weights, LoRA weights, beta, learning rates ...: NaN or inf would train or draw nothing (an
    all-black image, NaN weights) without any error of its own."""
    for name, value in values.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not math.isfinite(v):
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be a finite number")


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
