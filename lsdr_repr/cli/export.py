"""`lsdr export`: a trained backbone as timm/hf safetensors, ONNX or TorchScript."""

from __future__ import annotations

import argparse

from lsdr_repr.cli._common import add_command
from lsdr_repr.config import EXPORT_FORMATS


def register(sub) -> None:
    p = add_command(sub, "export", "Export a trained backbone (timm/hf safetensors, ONNX or "
                    "TorchScript).", "lsdr export runs/demo runs/demo/export --format timm")
    p.add_argument("source", help="run directory (newest valid checkpoint) or checkpoint file")
    p.add_argument("out", nargs="?", default=None,
                   help="output folder (default: export.out_dir of the run, else RUN_DIR/export)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                   help="default: export.format of the run's config (timm)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT (never other files)")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from lsdr_repr.export import export_backbone

    result = export_backbone(args.source, args.out, args.format, overwrite=args.overwrite)
    checks = ", ".join(f"{k} {v:.2g}" for k, v in result.max_abs_diff.items())
    print(f"wrote {result.format} export to {result.out_dir}: {', '.join(result.files)}")
    print(f"checked against the trained backbone (max |diff|): {checks}")
    return 0
