"""The tiny world: DCO's claims measured on a CPU in minutes.

A procedural world of captioned images (world.py), pixel-exact metrics that play the roles of the paper's DINO and
SigLIP scores (metrics.py), and a tiny model of SDXL's exact architecture trained on it (model.py, pretrain.py,
evaluate.py), shipped in tinyworld/model/ so that `load_sdxl("tinyworld/model")`, train.py and sample.py run on it.
"""
