"""The LaCy pipeline around the data-side signals (data/tagging.py, data/selection.py): per-token scoring
with a reference model, <CALL> selection runs, cascade inference with a larger model, FactScore."""
