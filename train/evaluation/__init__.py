"""Evaluation of trained runs: validation loss and knowledge probes per memory mode, routing diagnostics."""
