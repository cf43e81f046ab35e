"""Evaluation of a trained backbone, beside training (it imports `lsdr_repr.backbone`, never
`lsdr_repr.train`):

- `features`: the images of a shard spec or ImageFolder as the centre view, and their embeddings
- `cache`: features stored per (weights, data, view); `Evaluator`, a loaded backbone with its
  results folder and cache
- `probes`: the maths on frozen features (kNN, linear probe, invariance scores), pure tensors
- `frozen`: kNN, linear probe and effective rank of a backbone
- `invariance`: embedding cosine and retrieval under Kornia's transforms
- `finetune`: end-to-end fine-tuning with a new head
- `plots`, `results`, `report`: figures, RESULTS/<name>.json and W&B, the demo's report
- `online`: the trainer's injected validator (leave-one-out kNN over every rank's share)

The package imports nothing itself, so `import lsdr_repr.eval.X` loads only what X needs.
"""
