"""A-JEPA: Joint-Embedding Predictive Architecture for audio spectrograms (arXiv 2311.15830).

`ajepa.load_encoder(path)` loads an exported encoder (see ajepa.encoder); it is imported on first use,
so `import ajepa` (and the CLI) stays light."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_encoder":
        from ajepa.encoder import load_encoder
        return load_encoder
    raise AttributeError(f"module 'ajepa' has no attribute {name!r}")
