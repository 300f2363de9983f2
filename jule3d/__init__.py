"""jule3d: unsupervised segmentation of 3D medical images with JULE-3D."""
__version__ = "0.1.0"
