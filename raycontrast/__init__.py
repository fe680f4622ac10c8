"""raycontrast: pixel-contrast semantic segmentation, trained with Ray Train and searched with Ray Tune."""

__version__ = "0.1.0"
