"""The application layer over the core: run folders, the notebook pipeline, reports, batches, widgets, the CLI.

Nothing in the core (:mod:`jule3d` outside this subpackage) imports it. Its heavy dependencies (papermill,
nbconvert, Dask, ipywidgets, kaleido) are imported inside the functions that need them, so ``import jule3d`` and
``jule3d --help`` stay fast.
"""
