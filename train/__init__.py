"""memlm's top layer: the training loop, checkpointing, commands, LaCy pipeline, evaluation, experiments."""
from train.own_packages import claim

claim()  # memlm's package names resolve here, not to ./data or a PyPI `data` (see train/own_packages.py)
