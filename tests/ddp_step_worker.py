"""One training step of the real `Trainer` on a fixed batch, under torchrun or alone.

    torchrun --nproc_per_node 2 tests/ddp_step_worker.py CONFIG OUT_FILE key=value ...

Rank r takes the r-th slice of the same 16 images, so the global batch is identical whatever the
world size; rank 0 saves the loss and the updated weights to OUT_FILE.
"""

import sys

import torch

from lsdr_repr import distributed as dist
from lsdr_repr.config import load_config
from lsdr_repr.train import Trainer


def main() -> None:
    config, out_file, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    env = dist.read_dist_env()
    dist.init_distributed(env, "cpu")
    try:
        trainer = Trainer(cfg, env, torch.device("cpu"))
        images = torch.randint(0, 256, (16, 3, cfg.data.image_size, cfg.data.image_size),
                               generator=torch.Generator().manual_seed(123), dtype=torch.uint8)
        local = images.chunk(env.world_size)[env.rank]
        losses = []
        for _ in range(2):
            loss, out, _, applied = trainer.train_step(local)
            assert applied
            losses.append(float(loss))
        if env.rank == 0:
            torch.save({"losses": losses, "terms": {k: float(v) for k, v in out.terms.items()},
                        "model": trainer.model.state_dict()}, out_file)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()
