"""mpdit-dist: a distributed training system for multi-patch diffusion transformers (MPDiT)."""
__version__ = "0.1.0"
