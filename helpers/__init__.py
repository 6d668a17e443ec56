"""Helpers for the DiffLens book.

One module per noun, each introduced by a chapter:

* ``world``   — procedural portrait renderer, attributes, bias specs (chapter 1)
* ``judge``   — attribute classifiers trained on rendered ground truth; image features (chapter 1)
* ``models``  — load any diffusers UNet / the embedded model, DDIM sampling, training (chapter 1)
* ``metrics`` — Fairness Discrepancy with CIs and floors, FID, similarity, keep-rate (chapter 1)
* ``hooks``   — scoped capture / edit at named U-Net sites (default: the bottleneck, mid-block output) (chapter 2)
* ``harvest`` — sample with capture on, judge the images, resumable batch by batch (chapter 2)
* ``cache``   — content-keyed artifact folders, built atomically (chapter 2)
* ``sae``     — TopK sparse autoencoder with AuxK, sparse training step, save/load (chapter 3)
* ``probe``   — per-timestep linear classifier on h (chapter 4)
* ``attribution`` — integrated gradients (captum) over SAE latents, rankings per class (chapter 4)
* ``intervention`` — error-preserving scale/add edits with per-sample class targeting (chapters 4–5)
* ``widgets`` — β sliders that also work in the static book, and their headless-browser check (chapter 5)
* ``baselines`` — Activation, Latent Direction, H-Distribution, Latent Editing, Finetuning behind one
  interface (chapter 7)
* ``judges`` — judges for real images (CLIP zero-shot with any attribute's prompts, FairFace, your own) (chapter 8)
* ``tiny``    — tiny random SD / DDPM / CLIP pipelines for tests and chapter 8
* ``pipeline`` — the stages harvest → SAE → probe → IG + footprints → edit → evaluate, used by the runner
  and the chapters alike
* ``runner``  — ``python -m helpers run config.toml`` (chapter 8)
* ``chapters`` — each chapter's own experiments on the embedded model (``dissect``, ``identify``,
  ``sweeps``, ``benchmark``), run by its RECOMPUTE flag (chapters 2–7); no other module imports them
* ``plots``   — image grids
* ``io``      — atomic writes and safetensors checkpoints
"""
