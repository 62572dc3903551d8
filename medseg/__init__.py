"""medseg: 3D medical image segmentation with mixed precision and activation checkpointing."""

__version__ = "0.1.0"
