"""Training small decoders from scratch for architecture-level KV methods (MHA / GQA / MQA, CLA).

`python -m kvbench.train` is the Hydra CLI (`__main__.py`, `configs/train.yaml`); the rest imports only
torch and transformers, so scripts on a machine without Hydra or `datasets` use it directly:
`config` (settings and their checks), `data` (corpus, pieces, batch order), `model` (construction keyed by
`model.arch`, parameter counts), `checkpoint` (atomic checkpoints, loss log), `loop` (the training loop).
"""
