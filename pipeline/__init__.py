"""seg-pipeline: self-configuring 3D medical image segmentation, scaled out with Dask, Zarr and Ray.

Data flows one way: dataset -> fingerprint -> plan -> store -> train -> predict -> evaluate, one
subpackage per stage (`data`, `planning`, `preprocessing`, `training`, `inference`, `evaluation`).
`pipeline.stages` is the public API over them; `pipeline.cli` is a thin layer over that.
"""

__version__ = "0.1.0"
