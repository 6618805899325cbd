"""seg-pipeline: self-configuring 3D medical image segmentation, scaled out with Dask, Zarr and Ray.

Data flows one way: dataset -> fingerprint -> plan -> store -> train -> predict -> evaluate.
Each stage is a plain function in its own module; `pipeline.cli` is a thin layer over them.
"""

__version__ = "0.1.0"
