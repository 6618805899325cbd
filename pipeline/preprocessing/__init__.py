"""Preprocessing into the chunked Zarr store: crop, normalise, resample, pad, one case per Dask task,
and the store that holds the result (its layout, its per-case metadata, its integrity checks)."""
