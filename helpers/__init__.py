"""Helpers for the DiffLens book.

One module per noun, each introduced by a chapter:

* ``world``   — procedural portrait renderer, attributes, bias specs (chapter 1)
* ``judge``   — attribute classifiers trained on rendered ground truth; image features (chapter 1)
* ``models``  — load any diffusers UNet / the embedded model, DDIM sampling, training (chapter 1)
* ``metrics`` — Fairness Discrepancy with CIs and floors, FID, similarity, keep-rate (chapter 1)
* ``hooks``   — scoped capture / edit of the U-Net bottleneck (mid-block output) (chapter 2)
* ``plots``   — image grids
* ``io``      — atomic writes and safetensors checkpoints
"""
