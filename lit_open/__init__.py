"""lit-open: an open trainer for large language models (Lightning, Hydra recipes, litdata)."""

from lit_open.provenance import lit_open_version

__version__ = lit_open_version()

__all__ = ["__version__", "load_hf", "save_hf"]


def __getattr__(name: str):
    # Imported on first use, so that `import lit_open` does not load the checkpoint code.
    if name in ("load_hf", "save_hf"):
        from lit_open.checkpoint import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'lit_open' has no attribute {name!r}")
