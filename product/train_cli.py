"""train.py's command line: the flags in groups, their checks, --precision's dtypes, and main() with its errors.

None of this is the method. `python train.py --images ./dog` parses here (parse_args), trains in train.train(), and
every error a user (or the machine) causes ends in one line through errors.cli. The flags are documented in
docs/training.md.
"""
import argparse
import functools
import os
import sys

import torch

from baselines import dreambooth
from product import distributed, errors, float8, run_folder
from product.files import DTYPES, metadata_list, sha256
from product.images import RESAMPLE
from sdxl import SDXL_BASE, native_resolution
from text_encoder import check_prompt_length
from vae import check_tile

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
# The range of every numeric flag's meaning (errors.check_flags; left out = its default or not used). 0 is in the
# range only where it means something, and the help says what.
NUMBERS = {"resolution": ">= 8", "batch_size": ">= 1", "offset_noise": ">= 0", "beta": "> 0", "snr_gamma": "> 0",
           "steps": ">= 1", "rank": ">= 1", "alpha": "> 0", "lr": "> 0", "ti_lr": ">= 0", "lr_warmup": ">= 0",
           "grad_accum": ">= 1", "weight_decay": ">= 0", "grad_clip": "> 0", "seed": "seed",
           "checkpoint_every": ">= 0", "sample_steps": ">= 0", "num_class_images": ">= 1", "prior_weight": "> 0",
           "vae_tile": ">= 0"}
MEMORY_HINT = ("lower --resolution or --batch-size, add --gradient-checkpointing, or on a GPU use --precision bf16 "
               "(or fp8: half the weights); "
               "--resume continues from the last checkpoint")


def parse_args(argv=None):
    """The command line -> checked arguments (every error is a ValueError naming the flag)."""
    return check_args(parser().parse_args(argv))


def parser():
    """The flags of the method: data, model, loss, LoRA and optimisation; then those of the run."""
    p = argparse.ArgumentParser(description="Train a DCO LoRA (+ a new token) on SDXL.")
    g = p.add_argument_group("data")
    g.add_argument("--images", help="folder of training images; a caption per image in NAME.txt beside NAME.jpg")
    g.add_argument("--config", help="the official repo's data config.json (images, prompts, base_prompts, ...)")
    g.add_argument("--config-name", help="which entry of --config to train on")
    g.add_argument("--token", help='new token to learn, e.g. "<dog>" (default: <folder name> if that is a word)')
    g.add_argument("--init-word", help="existing one-token word the new token starts from, e.g. dog")
    g.add_argument("--resolution", type=int, help="default: the model's own, 1024 for SDXL (32 for tiny)")
    g.add_argument("--batch-size", type=int, default=1, help="per process (under torchrun: the global batch is "
                                                             "processes x batch size x --grad-accum)")
    g.add_argument("--offset-noise", type=float, default=0.0, help="0.1 helps learn solid colours (styles); 0: off")
    g.add_argument("--crop", choices=["center", "random"], default="center", help="where the RxR crop of the resized "
                   "image is taken (random: a new crop each step, as the official code)")
    g.add_argument("--random-flip", action="store_true", help="mirror each image with probability 1/2 per step")
    g.add_argument("--buckets", action="store_true", help="aspect-ratio buckets (kohya's rule): each image trains "
                   "at the size of area <= resolution^2 nearest its shape, not a square crop (product/buckets.py)")
    g.add_argument("--resample", choices=list(RESAMPLE), default="lanczos", help="resize filter (the official code: "
                   "bilinear)")
    g.add_argument("--time-ids", choices=["crop", "fixed"], default="crop", help="micro-conditioning: the real size "
                   "and crop (SDXL's training), or always (R, R, 0, 0, R, R) (the official code)")
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default=SDXL_BASE, help="hub id, diffusers folder, single-file .safetensors, sdxl-random "
                   "(the real shapes, random weights: a dry run of memory and speed), or tiny (the tiny SDXL of "
                   "tinyworld/: a real run on a CPU)")
    g.add_argument("--output", help="output folder (default: output/<images folder or config name>)")
    g.add_argument("--device", help="default: cuda if available, else cpu")
    g.add_argument("--vae", help="another VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for fp16")
    g.add_argument("--pool", choices=["eos", "argmax"], default="eos", help="text_encoder_2 pooling: at the EOS "
                   "(SDXL's training) or at argmax(ids) (transformers/diffusers; the official code trained so)")
    g = p.add_argument_group("the loss")
    g.add_argument("--loss", default="dco", choices=["dco", "db", "db-prior"])
    g.add_argument("--beta", type=float, default=1000.0, help="DCO's beta (1000-2000 work in the paper)")
    g.add_argument("--relative-reward", action="store_true", help="DCO with the reward relative to phi's error, "
                   "(l_phi - l_theta) / l_phi (dco.relative_reward; not the paper's; beta ~ 1-3, not 1000)")
    g.add_argument("--snr-gamma", type=float, help="min-SNR-gamma loss weights (Hang et al. 2023), e.g. 5; in DCO on "
                                                   "both errors, as the official code")
    g = p.add_argument_group("LoRA and optimisation")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--rank", type=int, default=32)
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, LoRA scale 1)")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--ti-lr", type=float, default=5e-6, help="learning rate of the new token rows (0: they stay "
                   "their init word's)")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine", "linear"],
                   help="after the warm-up: constant (the official), or a cosine / linear decay to 0 at --steps")
    g.add_argument("--lr-warmup", type=int, default=0, help="steps of linear warm-up from 0 to the learning rates "
                                                            "(0: none)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step: --batch-size B --grad-accum K "
                                                             "trains as --batch-size K*B in the memory of B")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's (0: none)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max norm of the gradient (> 0)")
    g.add_argument("--seed", type=int, default=0, help="0 .. 2^63-1")
    add_run_flags(p)
    return p


def add_run_flags(p):
    """The flags of the run: speed and memory, checkpoints and samples, db-prior's class images."""
    g = p.add_argument_group("speed and memory")
    g.add_argument("--precision", choices=PRECISIONS, help="dtype of the frozen UNet and text encoders, and of "
                   "autocast (default: bf16 on a GPU, fp32 on a CPU); fp8: their weights in float8 with a scale per "
                   "channel, computed in bf16 (half bf16's weight memory); the LoRA and token rows train in fp32")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--vae-tile", type=int, default=512, metavar="PX", help="images larger than PX x PX are encoded, "
                   "and checkpoint samples decoded, in overlapping tiles of this size (a tile's memory, not the "
                   "image's: GBs at 1024^2; close to, not exactly, the whole-image pass); 0: whole images")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU: faster steps after a "
                                                          "minute or two of compiling)")
    g = p.add_argument_group("checkpoints and samples")
    g.add_argument("--checkpoint-every", type=int, default=500, help="0: no checkpoints (a SIGTERM or Ctrl-C "
                   "still writes one of the step it stops after)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    g.add_argument("--bundle-token", action="store_true", help="also write the learned tokens into "
                   "lora_kohya.safetensors (A1111's bundle_emb keys): one file for A1111/Forge and sample.py")
    g.add_argument("--sample-prompt", action="append", help="prompt of the sample images (repeatable)")
    g.add_argument("--sample-steps", type=int, default=25, help="sampler steps of the sample images; 0: no samples")
    g.add_argument("--no-report", action="store_true", help="do not draw report.png and samples/progress.png at "
                   "checkpoints and the end (python -m product.report OUTPUT draws them any time)")
    g = p.add_argument_group("db-prior (DreamBooth with prior preservation)")
    g.add_argument("--class-prompt", help='prompt of the class images (default "a photo of a <init word>")')
    g.add_argument("--num-class-images", type=int, default=100)
    g.add_argument("--prior-weight", type=float, default=1.0)
    g.add_argument("--class-dir", help="cache of generated class images (default: <output>/class_images)")


def check_args(args):
    """Refuse what cannot train, in one line naming the flag, before anything is loaded; fill in the defaults that
    depend on other flags (the resolution, the output folder)."""
    if not (args.images or args.config):
        raise ValueError("pass --images DIR (or --config FILE --config-name NAME)")
    if bool(args.config) != bool(args.config_name):
        raise ValueError("--config and --config-name go together")
    if bool(args.token) != bool(args.init_word):
        raise ValueError("--token and --init-word go together, e.g. --token '<dog>' --init-word dog")
    errors.check_flags(vars(args), NUMBERS)
    if args.resolution is None:
        args.resolution = native_resolution(args.model)
    args.output = args.output or default_output(args.images, args.config_name)
    args.class_dir = args.class_dir or os.path.join(args.output, "class_images")
    check_tile(args.vae_tile)
    check_resolution(args.resolution, 8)  # the VAE's; the model's own factor once it is loaded (check_model_fits)
    if args.relative_reward and args.loss != "dco":
        raise ValueError(f"--relative-reward is an option of DCO's loss, not of --loss {args.loss}")
    if args.relative_reward and args.snr_gamma:  # r / l_phi divides the weights out: they would change nothing
        raise ValueError("--snr-gamma has no effect with --relative-reward (the weights cancel in r / l_phi): "
                         "use one of them")
    if args.device:
        errors.check_device(args.device)
    return args


def precision(name, device, random_weights=False):
    """-> (precision, dtype the frozen weights compute in, autocast context for it): bf16 on a GPU, fp32 on a CPU,
    unless --precision says otherwise. fp8 stores the frozen Linear/Conv weights in float8 and computes in bf16 (fp32
    on a CPU without bf16 kernels): product/float8.py. The LoRA and the token rows are fp32 in every case.
    random_weights (--model sdxl-random) saturate DCO's loss at once, and then every gradient is a denormal float,
    which x86 CPUs compute many times slower: they are flushed to zero so that the dry run times the real work
    (process-wide, and it changes the last bits, so only there: a real run keeps the arithmetic tests reproduce)."""
    if random_weights:
        torch.set_flush_denormal(True)
    name = name or ("bf16" if device.type == "cuda" else "fp32")
    if random_weights and device.type == "cpu":  # a dry run says what it measures
        print(f"sdxl-random on a CPU: measuring --precision {name} (a GPU run's default is bf16; --precision bf16 or "
              "fp8 measures those weights here)", file=sys.stderr)
    dtype = float8.compute_dtype_of(device) if name == "fp8" else DTYPES[name]
    return name, dtype, functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)


def default_output(images, config_name):
    """output/<the images folder's name, or the --config-name>."""
    return os.path.join("output", config_name or os.path.basename(os.path.normpath(images)))


def check_resolution(resolution, factor, what="this model (VAE and UNet downsampling)"):
    if resolution % factor:
        raise ValueError(f"--resolution {resolution}: must be a multiple of {factor} for {what}")


def check_model_fits(sd, args, paths, captions, tokens, class_prompt=None):
    """Once the model is loaded, before anything is written: its downsampling divides the resolution, the sampler's
    steps fit its schedule, a learned token is a new string (not a word CLIP already has), CLIP's 75-token window
    holds every learned token of every caption (a token past it trains nothing; longer prompts are read only in
    part), and db-prior's --class-dir holds no class images of other settings. -> the downsampling factor (VAE x
    UNet: 32 for SDXL), which --buckets' sizes are multiples of."""
    factor = sd.vae.factor * 2 ** (len(sd.unet.down_blocks) - 1)
    check_resolution(args.resolution, factor)
    timesteps = sd.scheduler.get("num_train_timesteps", 1000)
    if args.sample_steps >= timesteps:
        raise ValueError(f"--sample-steps {args.sample_steps}: must be below the model's {timesteps} timesteps "
                         "(0: no sample images)")
    for token in tokens:
        if len(sd.tokenizer.encode(token)) == 1:  # "dog" is one of CLIP's words: "training" it would hijack it
            raise ValueError(f"{'--config inserting_tokens' if args.config else '--token'} {token!r}: already a word "
                             f"of CLIP's vocabulary; a learned token must be a new string, e.g. '<{token}>'")
    if class_prompt:
        dreambooth.check_class_dir(args.class_dir, class_prompt, args.model, args.resolution)
    for path, caption in zip(paths, captions):
        if tokens and not any(t in caption for t in tokens):
            print(f"warning: the caption of {path} has no {' or '.join(tokens)}: {caption!r}", file=sys.stderr)
        where = args.config or os.path.splitext(path)[0] + ".txt"  # where the caption came from
        check_prompt_length((sd.tokenizer, sd.tokenizer_2), caption, f"{where}: the caption", tokens, strict=True)
    for prompt in args.sample_prompt or []:
        check_prompt_length((sd.tokenizer,), prompt, f"--sample-prompt {prompt[:40]!r}...", tokens)
    return factor


def run_config(args, device, world_size, precision, name, paths, captions, base_prompts, tokens, init_words, sizes):
    """train_config.json: every flag, and what train() found (the images and their digests, the size (h, w) each
    trains at, the captions, phi's base prompts, the tokens). --resume compares them with the run it continues
    (run_folder.FIXED_ON_RESUME)."""
    return {**vars(args), "name": name, "device": str(device), "precision": precision,
            "alpha": args.alpha or float(args.rank), "tokens": tokens, "init_words": init_words, "images": paths,
            "train_sizes": [list(s) for s in sizes],
            "image_sha256": [sha256(p) for p in paths], "captions": captions, "base_prompts": base_prompts,
            "world_size": world_size, "global_batch_size": world_size * args.batch_size * args.grad_accum}


def sample_prompts(given, captions, tokens):
    """The prompts of the sample images: --sample-prompt, else the first caption and the token playing saxophone."""
    return given or [captions[0]] + [f"a {t} playing saxophone in sticker style" for t in tokens[:1]]


def lora_file_metadata(args, tokens, init_words):
    """The safetensors metadata of every LoRA file written: the recipe, and the learned tokens for sample.py."""
    return {"base_model": args.model, "rank": str(args.rank), "alpha": str(args.alpha or float(args.rank)),
            "loss": args.loss, "beta": str(args.beta), "steps": str(args.steps), "resolution": str(args.resolution),
            "token": metadata_list(tokens), "init_word": metadata_list(init_words),  # JSON lists
            **({"pool": args.pool} if args.pool != "eos" else {})}  # sample.py samples with the same pooling


def main(train, argv=None):
    """Parse, train, and end every user error in one line (under torchrun only rank 0 prints it)."""
    parsed = []
    rank = int(os.environ.get("RANK", 0))

    def run():
        parsed.append(parse_args(argv))
        try:
            train(parsed[0])
        except RuntimeError as e:  # under torchrun, a collective that failed: another process died (or hung)
            if not distributed.is_peer_failure(e):
                raise
            raise ValueError(f"rank {rank}: another process stopped ({errors.first_line(e)}); run again with "
                             "--resume to continue from the last checkpoint") from None
        distributed.finish()
    errors.cli(run, memory_hint=MEMORY_HINT, next_command=lambda: resume_hint(parsed[0].output if parsed else None),
               quiet=rank != 0)


def resume_hint(out):
    """After Ctrl-C or a full disk: what the next command continues from."""
    if out is None:
        return "run the same command again"
    found = run_folder.checkpoints(out)
    return (f"the same command with --resume continues from {found[-1][1]}" if found else
            "no checkpoint was saved yet: run the same command again")
