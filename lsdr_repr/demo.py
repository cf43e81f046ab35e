"""`lsdr demo`: the main job on the embedded data, end to end.

sample shards (if missing) -> `configs/demo.yaml` training -> timm export -> linear probe of the
trained backbone against the same architecture at random initialisation, and the invariance table.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from lsdr_repr.config import load_config
from lsdr_repr.errors import ConfigError

log = logging.getLogger(__name__)

DEMO_CONFIG = "configs/demo.yaml"


@dataclasses.dataclass
class DemoResult:
    exit_code: int
    run_dir: Path
    checkpoint: Path | None = None
    wandb_path: str | None = None
    export_dir: Path | None = None
    report: str | None = None
    num_classes: int | None = None  # of the data, for the printed timm line
    is_main: bool = True  # rank 0 (or a single process): the one that evaluates and prints


def demo_config_path() -> Path:
    """The demo config of this checkout (editable install) or of the working directory."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        candidate = root / DEMO_CONFIG
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{DEMO_CONFIG} not found: run `lsdr demo` from the repository root")


def run_demo(run_dir: str, data_dir: str, overrides: Sequence[str] = ()) -> DemoResult:
    from data_pipelines.sample import write_sample_shards
    from lsdr_repr.distributed import read_dist_env
    from lsdr_repr.eval.online import online_validator
    from lsdr_repr.eval.report import demo_report, format_report
    from lsdr_repr.export import export_backbone
    from lsdr_repr.train import EXIT_OK, train

    splits = write_sample_shards(Path(data_dir))
    cfg = load_config(demo_config_path(), [
        f"train.run_dir={run_dir}",
        f"data.train_shards={splits['train']}",
        f"data.val_shards={splits['val']}",
        f"data.test_shards={splits['test']}",
        *overrides,
    ])
    result = train(cfg, validator=online_validator(cfg))
    demo = DemoResult(result.exit_code, Path(run_dir), result.checkpoint, result.wandb_path)
    if result.exit_code != EXIT_OK:
        return demo
    if read_dist_env().rank != 0:
        # Under torchrun every rank trains; one evaluates, exports and prints (the others would
        # repeat the two-minute evaluation and race on RUN_DIR/export).
        demo.is_main = False
        return demo
    # Evaluate first: the export's model card quotes the results written to RUN_DIR/eval.
    # bars on stderr: the two-minute evaluation is otherwise silent
    report = demo_report(Path(run_dir), str(splits["train"]), str(splits["test"]), progress=True)
    demo.report = format_report(report)
    demo.num_classes = report.get("num_classes")
    demo.export_dir = export_backbone(Path(run_dir), Path(run_dir) / "export", overwrite=True).out_dir
    return demo
