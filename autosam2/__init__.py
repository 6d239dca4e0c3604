"""AutoSAM2: SAM2 with a learned prompt encoder for colon-polyp video segmentation."""

__version__ = "0.1.0"
