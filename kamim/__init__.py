"""KAMIM: Keypoint Aware Masked Image Modelling."""

__version__ = "0.1.0"
