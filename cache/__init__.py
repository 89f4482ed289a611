"""The Zarr feature store (bottom layer: knows nothing of CLIP)."""
from cache.store import (CODE_VERSION, FeatureStore, IncompleteStoreError, MissingStoreError, StoreError,
                         StoreMismatchError, StoreWriter, mean_abs_diff, open_store, open_writer, write_region)

__all__ = ["CODE_VERSION", "FeatureStore", "IncompleteStoreError", "MissingStoreError", "StoreError",
           "StoreMismatchError", "StoreWriter", "mean_abs_diff", "open_store", "open_writer", "write_region"]
