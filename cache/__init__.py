"""The Zarr feature store (bottom layer: knows nothing of CLIP).

The store's names are loaded on first use, so `cache.files` (atomic writes, hashing) comes
without importing zarr and dask.
"""
__all__ = ["CODE_VERSION", "FeatureStore", "IncompleteStoreError", "Leftover", "MissingStoreError", "StoreError",
           "StoreMismatchError", "StoreWriter", "clear_leftovers", "leftovers", "mean_abs_diff", "mean_abs_diffs",
           "open_store", "open_writer", "write_region"]


def __getattr__(name: str):
    if name in __all__:
        from cache import store

        return getattr(store, name)
    raise AttributeError(f"module 'cache' has no attribute {name!r}")
