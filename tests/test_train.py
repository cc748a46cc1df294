"""train.py end to end on the tiny random SDXL (CPU; 64 px images = 8x8 latents): every output file and the
tools that read them (diffusers' load_lora_weights / load_textual_inversion as oracles), DCO's first step (exactly
log 2), phi = the pretrained model bit for bit, textual inversion touching only the new rows, a bit-exact --resume
(also after a SIGKILL), one copy of the UNet during DCO, the official config format, DreamBooth (+ prior) and the
one-line user errors."""
import contextlib
import copy
import gc
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train
from lora import apply_lora, load_lora_file, lora_parameters, lora_scale
from sdxl import load_sdxl
from text_encoder import resize_token_embeddings
from unet_loader import UNet

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "sdxl"
LOG2 = torch.tensor(math.log(2.0)).item()  # -log sigmoid(0) in float32, what the loss computes



def make_images(folder, sizes=((80, 64), (64, 96), (100, 100)), seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def argv(images, model, out, *extra):
    return ["--images", str(images), "--model", str(model), "--output", str(out), "--steps", "4",
            "--resolution", "64", "--device", "cpu", "--sample-steps", "0", *extra]


def run(*args, loss_fn=None):
    """train.train in this process (a subprocess would re-import torch); stderr captured."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result = train.train(train.parse_args(list(args)), loss_fn=loss_fn)
    return result, err.getvalue()


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 17]), torch.randn(2, 77, 64, generator=g),
            torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 80, 16, 8, 64, 64]]))


@pytest.fixture(scope="module")
def dco_run(tiny_sdxl, tmp_path_factory):
    """DCO + textual inversion (<dog> from the folder name), 4 steps, a checkpoint every 2."""
    root = tmp_path_factory.mktemp("dco")
    images = make_images(root / "dog")
    (images / "2.txt").write_text("a photo of a dog on the grass")  # no <dog>: warned about, still trained
    result, err = run(*argv(images, tiny_sdxl[0], root / "out", "--checkpoint-every", "2"))
    return result, images, root / "out", err


@pytest.fixture(scope="module")
def e2e(tiny_sdxl, tmp_path_factory):
    """`python train.py ...` as a user runs it, with sample images at each checkpoint."""
    root = tmp_path_factory.mktemp("e2e")
    out = root / "out"
    cmd = [sys.executable, str(ROOT / "train.py"), *argv(make_images(root / "dog"), tiny_sdxl[0], out),
           "--checkpoint-every", "2", "--sample-steps", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    return out


# ---------------------------------------------------------------------------------------------------------
# DCO

def test_first_step_is_log2_and_loss_finite(dco_run):
    _, _, out, _ = dco_run
    log = read_log(out)
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    print("DCO log:", [(r["loss"], r["implicit_reward"], round(r["time"], 3)) for r in log])
    assert log[0]["loss"] == LOG2 and log[0]["implicit_reward"] == 0.0  # theta = phi at step 0, exactly
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["implicit_reward"]) and r["lr"] == 5e-5 for r in log)
    assert log[-1]["implicit_reward"] != 0.0 and log[-1]["loss"] < LOG2  # it learned something phi did not know
    for r in log:  # per-sample rewards and timesteps, for the per-timestep saturation analysis
        assert len(r["t"]) == len(r["implicit_rewards"]) and all(0 <= t < 1000 for t in r["t"])
        assert r["implicit_reward"] == pytest.approx(sum(r["implicit_rewards"]) / len(r["implicit_rewards"]))


def test_relative_reward_flag_reaches_the_loss(tiny_sdxl, tmp_path):
    """--relative-reward: the first step is still exactly log 2 (theta = phi), and the logged rewards are the
    relative ones, r / l_phi = 1 - l_theta / l_phi (<= 1), not the plain DCO run's from the same seed."""
    images = make_images(tmp_path / "dog")
    run(*argv(images, tiny_sdxl[0], tmp_path / "rel", "--checkpoint-every", "0", "--relative-reward", "--beta", "3"))
    run(*argv(images, tiny_sdxl[0], tmp_path / "abs", "--checkpoint-every", "0", "--beta", "3"))
    rel, plain = read_log(tmp_path / "rel"), read_log(tmp_path / "abs")
    assert rel[0]["loss"] == LOG2 and rel[0]["implicit_reward"] == 0.0
    assert all(x <= 1 for r in rel for x in r["implicit_rewards"])
    assert rel[1]["implicit_reward"] != plain[1]["implicit_reward"]
    assert json.loads((tmp_path / "rel" / "train_config.json").read_text())["relative_reward"] is True


def test_phi_is_the_pretrained_model(dco_run, tiny_sdxl):
    result, _, _, _ = dco_run
    unet, base = result["sd"].unet, load_sdxl(str(tiny_sdxl[0])).unet
    x = unet_inputs()
    with torch.no_grad():
        want = base(*x)
        with lora_scale(unet, 0.0):
            phi = unet(*x)
        theta = unet(*x)
    assert torch.equal(phi, want)  # bit-identical after training
    assert (theta - want).abs().max() > 0  # and the LoRA did train


def test_textual_inversion_trains_only_the_new_rows(dco_run, tiny_sdxl):
    result, _, out, err = dco_run
    base = load_sdxl(str(tiny_sdxl[0]))
    dog = base.tokenizer.encode("dog")[0]
    learned = load_file(out / "learned_embeds.safetensors")
    ckpt = load_file(out / "checkpoint-2" / "learned_embeds.safetensors")
    for te, fresh, key in ((result["sd"].text_encoder, base.text_encoder, "clip_l"),
                           (result["sd"].text_encoder_2, base.text_encoder_2, "clip_g")):
        new = te.text_model.embeddings.token_embedding  # train.NewTokens
        old = fresh.text_model.embeddings.token_embedding.weight
        assert torch.equal(new.table.weight[: len(old)], old)  # all 49,408 old rows bit-identical
        assert new.table.weight.shape[0] == len(old) + 1 and not new.table.weight.requires_grad
        init = old[dog]
        assert torch.equal(learned[key], new.rows.detach()) and learned[key].shape == (1, old.shape[1])
        assert (learned[key][0] - init).abs().max() > 0  # the row trained ...
        for rows in (learned[key], ckpt[key]):  # ... and was rescaled to the init word's norm after each step
            assert torch.allclose(rows.norm(dim=-1), init.norm(), rtol=1e-6, atol=0)
    assert "warning:" in err and "2.png" in err and "<dog>" in err  # the caption without the token


def test_resume_continues_bit_exactly(dco_run, tiny_sdxl, tmp_path):
    _, images, straight, _ = dco_run
    out = tmp_path / "out"
    run(*argv(images, tiny_sdxl[0], out, "--checkpoint-every", "2"), "--steps", "2")
    assert (out / "checkpoint-2" / "optimizer.safetensors").is_file()
    with open(out / "log.jsonl", "a") as f:  # a step logged after the checkpoint, before a crash: dropped
        f.write(json.dumps({"step": 2, "loss": 123.0}) + "\n")
    run(*argv(images, tiny_sdxl[0], out, "--checkpoint-every", "2"), "--resume")
    for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors",
                 "checkpoint-4/optimizer.safetensors"):
        a, b = load_file(straight / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(straight)]


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tiny_sdxl, tmp_path):
    """`python train.py` killed with SIGKILL (no cleanup of any kind) after step 3 (its first checkpoint at 2), then
    --resume'd, ends with the same bits as an uninterrupted 20-step run. Every image has a caption and there is no
    --token, so this is also the run without textual inversion (a LoRA alone, e.g. for a style)."""
    images = make_images(tmp_path / "photos")
    for i in range(3):
        (images / f"{i}.txt").write_text(f"a photo of a dog, picture {i}")

    def args(out):
        return argv(images, tiny_sdxl[0], out, "--steps", "20", "--checkpoint-every", "2")

    killed = tmp_path / "killed"
    with open(tmp_path / "stderr.txt", "w") as err:  # a file, not a pipe: a full pipe would stall the run
        # the test hook (product/signals.py): the run stops itself (SIGSTOP) after step 3, so the kill lands there
        p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args(killed)], stdout=subprocess.DEVNULL,
                             stderr=err, cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "DCO_TEST_PAUSE": "step 3"})
        try:
            _, status = os.waitpid(p.pid, os.WUNTRACED)  # until it has stopped itself (no timing involved)
            assert os.WIFSTOPPED(status), (tmp_path / "stderr.txt").read_text()
            os.kill(p.pid, signal.SIGKILL)
        finally:
            p.kill()
            returncode = p.wait()
    done = sorted(int(d.name[11:]) for d in killed.glob("checkpoint-*") if d.name[11:].isdigit())
    print(f"killed with {len(read_log(killed))} steps logged, checkpoints {done}, "
          f"left behind: {sorted(d.name for d in killed.iterdir() if d.name.endswith('.tmp'))}")
    assert returncode == -signal.SIGKILL  # it was killed, it did not finish ...
    assert not (killed / "pytorch_lora_weights.safetensors").exists() and done == [2]  # ... after step 3

    _, err = run(*args(killed), "--resume")
    straight = tmp_path / "straight"
    run(*args(straight))
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "checkpoint-20/optimizer.safetensors"):
        a, b = load_file(straight / name), load_file(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log = read_log(killed)
    assert [r["step"] for r in log] == list(range(20))
    assert [r["loss"] for r in log] == [r["loss"] for r in read_log(straight)]

    # the 20-step run itself: finite losses, every file, no token, and a LoRA that changes the model
    assert log[0]["loss"] == LOG2 and all(math.isfinite(r["loss"]) for r in log)
    names = {str(f.relative_to(straight)) for f in straight.rglob("*") if f.is_file()}
    assert {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "train_config.json", "log.jsonl",
            "checkpoint-20/trainer_state.json"} <= names and not [n for n in names if n.endswith(".tmp")]
    assert "learned_embeds.safetensors" not in names and "warning" not in err
    assert json.loads((straight / "train_config.json").read_text())["tokens"] == []
    unet = load_sdxl(str(tiny_sdxl[0])).unet
    x = unet_inputs(2)
    with torch.no_grad():
        before = unet(*x)
        apply_lora(unet, load_lora_file(str(straight / "pytorch_lora_weights.safetensors"))[0]["unet"])
        assert (unet(*x) - before).abs().max() > 1e-3


def test_a_custom_loss_fn_is_the_one_trained_with(tiny_sdxl, tmp_path):
    """train(args, loss_fn=f): f gets (eps_theta, eps_phi, eps, beta) every step, and its value is what is optimised
    and logged -- the notebook's "modify the loss" exercise, without patching module globals."""
    calls = []

    def half_dco(eps_theta, eps_phi, eps, beta):
        calls.append((eps_theta.shape, eps_phi is not None, beta))
        loss, reward = train.dco_loss(eps_theta, eps_phi, eps, beta)
        return 0.5 * loss, reward

    run(*argv(make_images(tmp_path / "dog"), tiny_sdxl[0], tmp_path / "out"), "--steps", "3", "--beta", "7",
        "--checkpoint-every", "0", loss_fn=half_dco)
    assert len(calls) == 3 and all(phi and beta == 7.0 for _, phi, beta in calls)
    assert read_log(tmp_path / "out")[0]["loss"] == torch.tensor(0.5 * math.log(2.0)).item()


def test_dco_keeps_one_copy_of_the_unet(tiny_sdxl, tmp_path, monkeypatch):
    """phi is the same UNet with its LoRA off. Checked while training (inside the DCO loss of step 0): one UNet object
    was made, its parameters are the base weights plus the LoRA, each in its own storage, and no other live tensor
    holds a copy of any base weight (a deepcopy of the UNet or a saved state dict would)."""
    gc.collect()
    old = [o for o in gc.get_objects() if isinstance(o, (torch.Tensor, UNet))]  # kept alive: no address reused
    old_ids = {id(o) for o in old}
    seen = {}

    def spy(*args, **kwargs):
        if not seen:
            gc.collect()
            live = gc.get_objects()
            seen["unets"] = [o for o in live if isinstance(o, UNet) and id(o) not in old_ids]
            seen["tensors"] = [o for o in live if isinstance(o, torch.Tensor) and id(o) not in old_ids]
        return dco_loss(*args, **kwargs)

    dco_loss = train.dco_loss
    result, _ = run(*argv(make_images(tmp_path / "dog"), tiny_sdxl[0], tmp_path / "out"), "--steps", "1",
                    "--checkpoint-every", "0", loss_fn=spy)
    assert seen, "the DCO loss was never computed"
    (unet,) = seen["unets"]  # exactly one UNet object exists during training ...
    assert unet is result["sd"].unet
    base = dict(load_sdxl(str(tiny_sdxl[0])).unet.named_parameters())
    lora = lora_parameters(unet)
    params = dict(unet.named_parameters())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params.values()}
    n_base, n_lora = sum(p.numel() for p in base.values()), sum(p.numel() for p in lora)
    print(f"one UNet: {len(params)} parameters in {len(storages)} storages, {sum(storages.values()):,} bytes = "
          f"4 x ({n_base:,} base + {n_lora:,} LoRA)")
    assert len(storages) == len(params) and sum(storages.values()) == 4 * (n_base + n_lora)  # ... with one copy
    mine = set(storages)
    by_shape = {}
    for p in base.values():
        by_shape.setdefault(tuple(p.shape), []).append(p)
    copies = [t for t in seen["tensors"] if t.device.type == "cpu" and t.untyped_storage().data_ptr() not in mine
              and any(t.dtype == p.dtype and torch.equal(t, p) for p in by_shape.get(tuple(t.shape), []))]
    assert len(seen["tensors"]) > len(params) and not copies  # no second copy of any base weight anywhere

# ---------------------------------------------------------------------------------------------------------
# The files, as `python train.py` writes them, and the tools that read them

def test_writes_every_output_file(e2e):
    names = {str(p.relative_to(e2e)) for p in e2e.rglob("*") if p.is_file()}
    for f in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "learned_embeds.safetensors",
              "train_config.json", "log.jsonl", "samples/step000002-0.png", "samples/step000004-1.png",
              "checkpoint-2/optimizer.safetensors", "checkpoint-4/trainer_state.json"):
        assert f in names, f
    assert not [n for n in names if n.endswith(".tmp")]
    assert len(read_log(e2e)) == 4 and read_log(e2e)[0]["loss"] == LOG2
    config = json.loads((e2e / "train_config.json").read_text())
    assert set(vars(train.parse_args(["--images", "x"]))) <= set(config)  # every argument
    assert config["tokens"] == ["<dog>"] and config["init_words"] == ["dog"]
    assert config["base_prompts"] == ["a photo of dog"] * 3 and config["captions"] == ["a photo of <dog>"] * 3
    with safe_open(e2e / "pytorch_lora_weights.safetensors", "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("rank", "alpha", "loss", "beta", "steps", "token", "init_word")} == \
        {"rank": "32", "alpha": "32.0", "loss": "dco", "beta": "1000.0", "steps": "4", "token": '["<dog>"]',
         "init_word": '["dog"]'}  # JSON lists (files.metadata_list): a token may hold any character
    assert Image.open(e2e / "samples" / "step000004-0.png").size == (64, 64)


def sgm_attention(name, layers_per_block):
    """diffusers attention block -> SGM block, the rule behind lora_block_map.tsv (SDXL: 2 layers per block)."""
    p = name.split(".")
    if p[0] == "down_blocks":
        return f"input_blocks.{1 + int(p[1]) * (layers_per_block + 1) + int(p[3])}.1"
    if p[0] == "up_blocks":
        return f"output_blocks.{int(p[1]) * (layers_per_block + 1) + int(p[3])}.1"
    return "middle_block.1"


def test_kohya_names_follow_lora_block_map(e2e, tiny_sdxl):
    rows = [line.split("\t") for line in open(DATA / "lora_block_map.tsv") if line.startswith("attention\t")]
    for _, diffusers_prefix, sgm, kohya, *_ in rows:  # the rule reproduces the map for SDXL ...
        assert sgm_attention(diffusers_prefix, 2) == sgm and kohya == "lora_unet_" + sgm.replace(".", "_")
    peft = load_file(e2e / "pytorch_lora_weights.safetensors")
    kohya = load_file(e2e / "lora_kohya.safetensors")
    layers = json.loads((Path(tiny_sdxl[0]) / "unet" / "config.json").read_text())["layers_per_block"]
    want = set()
    for key in peft:  # ... and the trained file follows it on the tiny UNet, tensor for tensor
        module = key.removeprefix("unet.").rsplit(".lora_", 1)[0]
        block, _, inner = module.partition(".transformer_blocks.")
        k = "lora_unet_" + (sgm_attention(block, layers) + ".transformer_blocks." + inner).replace(".", "_")
        down, up = (".lora_down.weight", ".lora_A") if ".lora_A." in key else (".lora_up.weight", ".lora_B")
        assert torch.equal(kohya[k + down], peft[key]) and kohya[k + ".alpha"].item() == 32.0
        want |= {k + down, k + ".alpha"}
    assert set(kohya) == want
    ours = load_sdxl(str(tiny_sdxl[0])).unet  # and our loader reads the kohya file back as the PEFT one
    back = load_lora_file(str(e2e / "lora_kohya.safetensors"), {"unet": ours}, ours.config)[0]["unet"]
    assert set(back) == {key.removeprefix("unet.").rsplit(".lora_", 1)[0] for key in peft}
    assert all(torch.equal(d, peft[f"unet.{n}.lora_A.weight"]) and torch.equal(u, peft[f"unet.{n}.lora_B.weight"])
               and a == 32.0 for n, (d, u, a) in back.items())


def test_diffusers_loads_the_lora_files(e2e, tiny_sdxl):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (not installed)")
    folder, pipe = tiny_sdxl
    ours = load_sdxl(str(folder))
    apply_lora(ours.unet, load_lora_file(str(e2e / "pytorch_lora_weights.safetensors"))[0]["unet"])
    x = unet_inputs(1)
    with torch.no_grad():
        got, base = ours.unet(*x), pipe.unet(*x[:3], added_cond_kwargs={"text_embeds": x[3], "time_ids": x[4]}).sample
    for weight_name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        theirs = copy.deepcopy(pipe)
        theirs.load_lora_weights(str(e2e), weight_name=weight_name)
        with torch.no_grad():
            want = theirs.unet(*x[:3], added_cond_kwargs={"text_embeds": x[3], "time_ids": x[4]}).sample
        diff = (got - want).abs().max().item()
        effect = (want - base).abs().max()
        print(f"{weight_name} in diffusers vs ours: max abs diff {diff:.3g}; LoRA effect {effect:.3g}")
        assert diff <= 1e-5 and effect > 1e-3


def encode_with_learned_token(e2e, tiny_sdxl):
    """(diffusers' pipe.encode_prompt, ours) for prompts with <dog>, both from learned_embeds.safetensors."""
    folder, pipe = tiny_sdxl
    pipe = copy.deepcopy(pipe)
    state = load_file(e2e / "learned_embeds.safetensors")
    # as the official README loads learned_embeds.safetensors
    pipe.load_textual_inversion(state["clip_l"], token=["<dog>"], text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=["<dog>"], text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    ours = load_sdxl(str(folder))  # what a user of our files does: add the token, set its rows
    for tok, te, key in ((ours.tokenizer, ours.text_encoder, "clip_l"),
                         (ours.tokenizer_2, ours.text_encoder_2, "clip_g")):
        (i,) = tok.add_tokens(["<dog>"])
        with torch.no_grad():
            resize_token_embeddings(te, len(tok.vocab)).weight[i] = state[key][0]
    prompts = ["a photo of <dog> on the beach", "<dog>"]
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        got, pooled = ours.encode_prompt(prompts)
    return (want, want_pooled), (got, pooled)


def test_diffusers_loads_learned_embeds(e2e, tiny_sdxl):
    (want, _), (got, _) = encode_with_learned_token(e2e, tiny_sdxl)
    diff = (got - want).abs().max().item()
    print(f"prompt embeddings [B,77,64] with <dog>, diffusers vs ours: max abs diff {diff:.3g}")
    assert diff <= 1e-5


def test_pooled_embedding_with_learned_token_is_taken_at_eos(e2e, tiny_sdxl):
    """With <dog> (id 49408) in the prompt, diffusers/transformers pool at argmax(input_ids) -- the new token, because
    SDXL's configs carry the legacy eos_token_id 2 -- while we pool at the end-of-text token, as the model was
    trained. Ours must equal transformers' own final states taken at EOS, and differ from what diffusers returns."""
    (_, diffusers_pooled), (_, ours) = encode_with_learned_token(e2e, tiny_sdxl)
    _, pipe = tiny_sdxl
    pipe = copy.deepcopy(pipe)
    state = load_file(e2e / "learned_embeds.safetensors")
    pipe.load_textual_inversion(state["clip_g"], token=["<dog>"], text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    ids = pipe.tokenizer_2(["a photo of <dog> on the beach", "<dog>"], padding="max_length", max_length=77,
                           truncation=True, return_tensors="pt").input_ids
    assert (ids.argmax(-1) != (ids == 49407).int().argmax(-1)).all()  # argmax really is not the EOS here
    with torch.no_grad():
        last = pipe.text_encoder_2(ids).last_hidden_state  # after the final LayerNorm
        at_eos = pipe.text_encoder_2.text_projection(last[torch.arange(2), (ids == 49407).int().argmax(-1)])
    print(f"pooled with <dog>: ours vs transformers-at-EOS {(ours - at_eos).abs().max():.3g}, "
          f"ours vs diffusers (argmax) {(ours - diffusers_pooled).abs().max():.3g}")
    assert (ours - at_eos).abs().max() <= 1e-5
    assert (ours - diffusers_pooled).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# The other losses and the official data format

def test_db_and_db_prior(tiny_sdxl, tmp_path):
    images = make_images(tmp_path / "dog")
    run(*argv(images, tiny_sdxl[0], tmp_path / "db", "--loss", "db", "--steps", "2"))
    log = read_log(tmp_path / "db")
    assert len(log) == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 and "implicit_reward" not in r for r in log)
    cache = tmp_path / "class"
    for out in ("prior", "prior2"):  # the second run finds the class images cached
        run(*argv(images, tiny_sdxl[0], tmp_path / out, "--loss", "db-prior", "--steps", "2", "--sample-steps", "2",
                  "--num-class-images", "2", "--class-dir", str(cache)))
        if out == "prior":
            stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.png")}
    assert len(stamps) == 2 and stamps == {p: p.stat().st_mtime_ns for p in cache.glob("*.png")}
    assert json.loads((cache / "info.json").read_text())["prompt"] == "a photo of a dog"
    assert all(math.isfinite(r["loss"]) for r in read_log(tmp_path / "prior2"))


def test_official_config_format(tiny_sdxl, tmp_path):
    images = make_images(tmp_path / "data" / "imgs", sizes=((64, 64), (72, 64)))
    cfg = {"full_ti": {"images": ["imgs/0.png", "imgs/1.png"],
                       "prompts": ["a <toy> on a table", "a photo of a <toy>, macro style"],
                       "base_prompts": ["a toy on a table", "a photo of a toy, macro style"],
                       "inserting_tokens": ["<toy>"], "initializer_tokens": ["toy"]}}
    (tmp_path / "data" / "config.json").write_text(json.dumps(cfg))
    result, err = run("--config", str(tmp_path / "data" / "config.json"), "--config-name", "full_ti",
                      *argv(images, tiny_sdxl[0], tmp_path / "out")[2:], "--steps", "1")
    config = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert config["tokens"] == ["<toy>"] and config["base_prompts"] == cfg["full_ti"]["base_prompts"]
    assert read_log(tmp_path / "out")[0]["loss"] == LOG2 and "warning" not in err
    assert load_file(tmp_path / "out" / "learned_embeds.safetensors")["clip_g"].shape == (1, 32)


# ---------------------------------------------------------------------------------------------------------
# User errors: one line, non-zero exit, nothing written

@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "token-only", "init-word-2-tokens",
                                  "resolution-8", "resolution-unet", "no-token-for-folder", "resume-nothing",
                                  "no-images", "caption-without-token", "config-lengths", "config-name",
                                  "missing-model"])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_sdxl, tmp_path):
    images, extra, model = tmp_path / "dog", [], tiny_sdxl[0]
    if case != "missing":
        make_images(images, sizes=((64, 64),))
    config = tmp_path / "config.json"
    names = {"missing": f"--images {images}", "empty": "--images", "no-images": "--images", "unreadable": "1.png",
             "token-only": "--token", "init-word-2-tokens": "--init-word", "resolution-8": "--resolution",
             "resolution-unet": "--resolution", "no-token-for-folder": "--token", "resume-nothing": "--resume",
             "caption-without-token": str(images / "0.txt"), "config-lengths": str(config),
             "config-name": "--config-name", "missing-model": "--model"}  # what the message must name
    if case == "empty":
        (images / "0.png").unlink()
    elif case == "no-images":  # only a caption and a stray file: nothing to train on
        (images / "0.png").rename(images / "0.gif.txt")
        (images / "notes.md").write_text("dog photos")
    elif case == "caption-without-token":  # an explicit --token that the caption never says
        (images / "0.txt").write_text("a photo of a dog")
        extra = ["--token", "<sks>", "--init-word", "dog"]
    elif case in ("config-lengths", "config-name"):
        config.write_text(json.dumps({"toy": {"images": [str(images / "0.png")] * 2, "prompts": ["a <toy>"],
                                              "inserting_tokens": ["<toy>"], "initializer_tokens": ["toy"]}}))
        extra = ["--config", str(config), "--config-name", "toy" if case == "config-lengths" else "tyo"]
    elif case == "missing-model":
        model = tmp_path / "no_such_model"
    elif case == "unreadable":
        (images / "1.png").write_bytes(b"not a png")
    elif case == "token-only":
        extra = ["--token", "<sks>"]
    elif case == "init-word-2-tokens":
        extra = ["--token", "<sks>", "--init-word", "teddy bear"]
    elif case == "resolution-8":
        extra = ["--resolution", "60"]
    elif case == "resolution-unet":
        extra = ["--resolution", "72"]  # a multiple of 8 but not of 8 (VAE) x 4 (UNet) = 32
    elif case == "no-token-for-folder":
        images = images.rename(tmp_path / "my_photos")
    elif case == "resume-nothing":
        extra = ["--resume"]
    with pytest.raises(SystemExit) as e:
        train.main(argv(images, model, tmp_path / "out", *extra))
    msg = str(e.value.code)
    print(case, "->", msg)
    assert msg.startswith("error: ") and "\n" not in msg
    assert names[case] in msg
    assert not (tmp_path / "out").exists()


def test_bad_input_from_the_command_line(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--images", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 1 and p.stderr == f"error: --images {tmp_path / 'nope'}: no such folder\n"
    assert not (tmp_path / "output").exists()
