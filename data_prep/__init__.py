"""Offline latent sharding: ImageFolder -> (VAE | identity) -> MDS / WebDataset shards + manifest.

Entry point: ``python -m data_prep.encode`` or :func:`data_prep.encode.encode_dataset`.
Small ImageFolders for demos and tests: :mod:`data_prep.fixtures`.
"""
