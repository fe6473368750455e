"""Hierarchical FFN memories (arXiv 2510.02375): config + accounting (config.py), banks and fetching
(bank.py), the memory-augmented model (model.py), the MiniLM + k-means router (router.py).
Plain torch/numpy; FAISS and transformers are imported lazily by the router only."""
