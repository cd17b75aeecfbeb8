"""LabelEnc (Hao et al., ECCV 2020) for torchvision detectors: label-encoding intermediate supervision."""

__version__ = "0.1.0"
