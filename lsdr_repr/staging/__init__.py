"""Staging: everything between the loader and the model, in the trainer process.

- `feed`: `Staging`, the component the trainer reads batches from (augmented views of each
  micro-batch, one batch staged ahead) and checkpoints (loader position, augmentation RNG)
- `prefetch`: `Prefetcher`, batch k+1 staged on a side stream while step k runs
- `device`: the host-to-device copy, and GPU decode + resize for `data.decode: gpu`
"""
