"""`augment.kornia`: any `kornia.augmentation` module, named in the config, on the GPU views.

    augment:
      kornia:
        - {op: RandomPlanckianJitter, mode: blackbody, p: 0.5}
        - {op: RandomPlasmaShadow, p: 0.3, views: [1]}   # only on view 1
        - {op: RandomPerspective, distortion_scale: 0.3, p: 0.3}

Each entry is a class of `kornia.augmentation` (a 2-D augmentation: AugmentationBase2D) and its
keyword arguments, plus an optional `views` list (indices, default every view). `check_specs`
validates the list when the config loads, so a typo is a one-line ConfigError naming the key and
the close names instead of a traceback at the first batch; `build` makes the modules. They run
eagerly on [0,1] views after the built-in ops and before normalisation (kornia's modules draw
their parameters with Python control flow, so they are not part of the compiled graph).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from lsdr_repr.errors import ConfigError

RESERVED = ("op", "views")


def _augmentation_classes() -> dict[str, type]:
    import kornia.augmentation as K

    return {name: obj for name, obj in vars(K).items()
            if inspect.isclass(obj) and issubclass(obj, K.AugmentationBase2D)
            and not inspect.isabstract(obj) and not name.endswith("Base2D")}


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _resolve(entry: dict[str, Any], key: str, source: str) -> tuple[type, dict[str, Any]]:
    """The class and keyword arguments of one entry, or a one-line ConfigError."""
    name = entry.get("op")
    if not isinstance(name, str):
        raise ConfigError(f"{source}: {key}.op: expected a kornia.augmentation class name, "
                          f"e.g. {{op: RandomPlanckianJitter, p: 0.5}}, got {name!r}")
    classes = _augmentation_classes()
    if name not in classes:
        raise ConfigError(f"{source}: {key}.op: kornia.augmentation has no 2-D augmentation "
                          f"{name!r}{_suggest(name, sorted(classes))}")
    cls = classes[name]
    kwargs = {k: v for k, v in entry.items() if k not in RESERVED}
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [p for p in params if p != "self"]
    for arg in kwargs:
        if arg not in params and not takes_any:
            raise ConfigError(f"{source}: {key}.{arg}: {name} takes no argument {arg!r}"
                              f"{_suggest(arg, allowed)} (it takes: {', '.join(allowed)})")
    return cls, kwargs


def views_of(entry: dict[str, Any], total: int) -> list[int]:
    """The view indices an entry applies to (every view when `views` is absent)."""
    views = entry.get("views")
    return list(range(total)) if views is None else [int(v) for v in views]


def check_specs(entries: list[dict[str, Any]], source: str = "config",
                total_views: int | None = None) -> None:
    """Raise a one-line ConfigError for the first entry kornia cannot build."""
    for i, entry in enumerate(entries):
        key = f"augment.kornia[{i}]"
        cls, kwargs = _resolve(entry, key, source)
        views = entry.get("views")
        if views is not None and (not isinstance(views, list)
                                  or not all(isinstance(v, int) and v >= 0 for v in views)
                                  or (total_views is not None
                                      and any(v >= total_views for v in views))):
            limit = "" if total_views is None else f" below {total_views}"
            raise ConfigError(f"{source}: {key}.views: expected a list of view indices{limit}, "
                              f"got {views!r}")
        p = kwargs.get("p")
        if p is not None and not (isinstance(p, (int, float)) and 0 <= p <= 1):
            # kornia takes any p: above 1 it is always applied, below 0 silently never
            raise ConfigError(f"{source}: {key}.p: a probability in [0, 1], got {p!r}")
        # kornia checks values in its constructors and raises several types: name the entry and
        # keep kornia's words
        try:
            cls(**kwargs)
        except Exception as exc:  # noqa: BLE001
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{source}: {key}: {entry['op']}({_kwargs(kwargs)}) "
                              f"failed: {reason}") from None


def build(entries: list[dict[str, Any]]) -> list[nn.Module]:
    """The modules of a checked `augment.kornia` list, in order."""
    return [cls(**kwargs) for cls, kwargs in
            (_resolve(e, f"augment.kornia[{i}]", "config") for i, e in enumerate(entries))]


def _kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
