"""Hierarchical FFN memories (arXiv 2510.02375): config + accounting (config.py); the declared bank
interface, fetching and the resident bank (bank.py); offloaded banks (offload.py) over per-level row
tables (row_store.py) read ahead by prefetch.py, on-disk format bank_io.py, chosen by storage.py; the
sparse lazy AdamW of bank rows (sparse_adam.py); the memory-augmented model (model.py); the MiniLM window
embeddings (embed.py) and the k-means router (router.py). Plain torch/numpy; FAISS and transformers are
imported lazily by the router and the embedder only."""
