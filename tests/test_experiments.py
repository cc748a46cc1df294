"""tinyworld/experiments.py end to end on a random tiny SDXL (1 seed, a subject and a style, a few steps): every
CSV row, the merge and the interference analysis, the tables and plots; and product/plot.py's drawing."""
import csv
import json
import os

import numpy as np
import pytest

from product import plot
from tinyworld import experiments, model


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory):
    te, te2 = model.build_text_encoders(0)
    folder = str(tmp_path_factory.mktemp("tiny") / "model")
    return model.save_model(folder, model.new_unet(0), model.new_vae(0), te, te2)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_experiments_smoke(random_tiny, tmp_path):
    out, work = tmp_path / "docs", tmp_path / "work"
    # --jobs 2: the pair checker+pastel in one worker process, outline alone in the other
    args = experiments.parse_args(["--model", random_tiny, "--output", str(out), "--work", str(work), "--seeds", "3",
                                   "--concepts", "checker,pastel,outline", "--betas", "1000", "--merge-betas", "1000",
                                   "--steps", "2", "--n-eval", "2", "--sample-steps", "2", "--wcons", "0,2",
                                   "--num-class-images", "1", "--jobs", "2", "--rel-betas", "2",
                                   "--ziplora-steps", "2"])
    experiments.run_parallel(args)
    runs = rows(out / "tinyworld_runs.csv")
    methods = ["db", "db-prior", "dco-1000", "dco-rel-2"]
    # per concept: the base model once, then every method at every w_con
    assert len(runs) == 3 * (1 + len(methods) * 2)
    assert {(r["concept"], r["method"]) for r in runs} == {(c, m) for c in ("checker", "pastel", "outline")
                                                           for m in ["base"] + methods}
    # the subject and style LoRAs of a merge start from different random inits
    seeds = {json.load(open(work / f"{c}_db_s3" / "train_config.json"))["seed"] for c in ("checker", "pastel")}
    assert len(seeds) == 2
    for r in runs:
        assert r["seed"] == "3" and r["n"] == "2"
        assert 0 <= float(r["fidelity"]) <= 1 and 0 <= float(r["prompt_fidelity"]) <= 1
    assert {r["kind"] for r in runs if r["concept"] == "pastel"} == {"style"}
    assert all(r["texture"] != "" for r in runs if r["concept"] == "checker")  # subject fidelity's parts
    assert all(r["texture"] == "" for r in runs if r["concept"] != "checker")
    merges = rows(out / "tinyworld_merge.csv")
    assert {(r["method"], r["wcon"]) for r in merges} == {(m, w) for m in ("db", "db-ziplora", "dco-1000", "dco-rel-2")
                                                          for w in ("0.0", "2.0")}
    zipped = json.load(open(work / "merge_checker_pastel_db-ziplora_s3" / "merge_config.json"))
    assert zipped["merge_method"] == "ziplora" and json.loads(zipped["ziplora"])["steps"] == 2
    assert all(float(r["merge_s"]) > 0 and float(r["lora_train_s"]) > 0 for r in merges)  # timed side by side
    inter = rows(out / "tinyworld_interference.csv")
    assert [r["method"] for r in inter] == ["db", "dco-1000", "dco-rel-2"]  # ZipLoRA zips the db pair: not repeated
    assert all(0 <= float(r["col_cos"]) <= 1 and float(r["norm_subject"]) > 0 for r in inter)
    for f in ("tinyworld_pareto.png", "tinyworld_merge.png", "tinyworld_samples.png", "tinyworld_results.md"):
        assert (out / f).is_file(), f
    text = (out / "tinyworld_results.md").read_text()
    assert "| dco-1000 | plain |" in text and "Seeds [3]" in text
    assert "| dco-1000 | " in text.split("by timestep")[1]  # the per-timestep saturation table
    assert "three parts of subject fidelity" in text
    # --report remakes the same tables from the CSVs alone
    (out / "tinyworld_results.md").unlink()
    experiments.report(experiments.parse_args(["--output", str(out), "--work", str(work), "--report"]))
    remade = (out / "tinyworld_results.md").read_text()
    assert "| db merge | 2 |" in remade and "| dco-1000 | " in remade.split("by timestep")[1]
    assert "| db ziplora | 2 |" in remade and "a ZipLoRA merge takes" in remade
    assert "| dco-rel-2 | " in remade.split("Follow-up")[1] and "| db ziplora | – |" in remade
    sat = rows(out / "tinyworld_saturation.csv")  # one row per DCO run: the gradient left, by timestep
    assert sorted(r["concept"] for r in sat) == sorted(2 * ["checker", "outline", "pastel"])
    assert {r["method"] for r in sat} == {"dco-1000", "dco-rel-2"}
    assert all(0 <= float(r["w"]) <= 2 for r in sat)
    # --append with a new method: only it runs (and the LoRAs its merges need); nothing already there is repeated
    before = {k: rows(out / f"tinyworld_{k}.csv") for k in ("runs", "merge")}
    experiments.run_parallel(experiments.parse_args(
        ["--model", random_tiny, "--output", str(out), "--work", str(work), "--seeds", "3", "--concepts",
         "checker,pastel,outline", "--methods", "db,dco-rel", "--rel-betas", "2,5", "--steps", "2", "--n-eval", "2",
         "--sample-steps", "2", "--wcons", "0,2", "--jobs", "2", "--ziplora-steps", "2", "--append"]))
    after = {k: rows(out / f"tinyworld_{k}.csv") for k in ("runs", "merge")}
    assert after["runs"][:len(before["runs"])] == before["runs"]
    assert {r["method"] for r in after["runs"][len(before["runs"]):]} == {"dco-rel-5"}
    assert {r["method"] for r in after["merge"][len(before["merge"]):]} == {"dco-rel-5"}


def test_seed_stats_average_concepts_first_then_seeds():
    rs = [{"seed": "0", "v": 0.2}, {"seed": "0", "v": 0.4}, {"seed": "1", "v": 0.5}]
    (mean, std, n), = experiments.seed_stats(rs, lambda r: "k", "v").values()
    assert n == 2 and mean == pytest.approx(0.4) and std == pytest.approx(np.std([0.3, 0.5], ddof=1))


def test_plot_puts_points_where_they_belong():
    img = plot.lines([plot.Series("a", [(0.0, 0.0), (1.0, 1.0)], color=(255, 0, 0))], size=(300, 200),
                     xrange=(0, 1), yrange=(0, 1))
    a = np.asarray(img)
    assert img.size == (300, 200)
    red = (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)
    ys, xs = np.nonzero(red[:, 100:])  # right of the legend
    # the line runs from bottom left to top right: higher x, smaller row
    assert np.corrcoef(xs, ys)[0, 1] < -0.9
    assert plot.ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_cli_runs_on_the_tiny_model_at_its_own_resolution(random_tiny, tmp_path, monkeypatch):
    """`--model tiny` (here: a folder of the same kind) makes train.py, sample.py and merge.py a real CPU run."""
    import merge
    import sample
    import sdxl
    import train
    from PIL import Image

    from tinyworld import world

    assert sdxl.model_path("tiny") == sdxl.TINY == model.MODEL_DIR
    assert sdxl.native_resolution(random_tiny) == world.SIZE
    assert sdxl.native_resolution("stabilityai/stable-diffusion-xl-base-1.0") == 1024
    outs = []
    for name in ("checker", "pastel"):
        c = world.concept(name)
        out = str(tmp_path / name)
        argv = ["--images", os.path.join(world.CONCEPTS_DIR, name), "--model", random_tiny, "--output", out,
                "--steps", "2", "--rank", "2", "--token", c.token, "--init-word", c.init_word,
                "--checkpoint-every", "0", "--sample-steps", "0"]
        assert train.parse_args(argv).resolution == world.SIZE  # not SDXL's 1024
        train.main(argv)
        assert json_of(os.path.join(out, "train_config.json"))["resolution"] == world.SIZE
        outs.append(out)
    merge.main([*outs, "--output", str(tmp_path / "merged")])  # base model from the LoRAs' metadata
    png = str(tmp_path / "x.png")
    sample.main(["--model", random_tiny, "--lora", str(tmp_path / "merged"), "--prompt",
                 "a big <checker> circle at the center on a red background, <pastel> style", "--wcon", "2",
                 "--n", "1", "--steps", "2", "--output", png])
    assert Image.open(png).size == (world.SIZE, world.SIZE)


def json_of(path):
    import json

    with open(path) as f:
        return json.load(f)


def test_append_to_an_older_csv_adds_the_new_columns(tmp_path):
    """A CSV written before a column existed (the old merge CSV had no merge_s) is rewritten with the new header:
    old rows keep their values (new columns empty), new rows are read back under the right names."""
    path = str(tmp_path / "m.csv")
    experiments.append(path, ["a", "b"], [{"a": 1, "b": 2}])
    experiments.append(path, ["a", "b", "c"], [{"a": 3, "b": 4, "c": 5}])
    assert rows(path) == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"}]
