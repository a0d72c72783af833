#!/usr/bin/env python
"""Thin entry point: ``python train.py --config FILE [--run-dir DIR] [--resume auto|never|PATH] [key=value ...]``."""
from mpdit_dist.trainer import main

if __name__ == "__main__":
    main()
