"""Orchestration: resumable stage runner, the end-to-end demo, reproduction experiments and their reports."""
