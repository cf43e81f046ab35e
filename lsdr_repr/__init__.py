"""lsdr-repr: learn image representations invariant to lighting, rotation and scale."""

__version__ = "0.1.0"
