"""A-JEPA: Joint-Embedding Predictive Architecture for audio spectrograms (arXiv 2311.15830)."""

__version__ = "0.1.0"
