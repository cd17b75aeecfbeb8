"""torchvision detectors, their family adapters and backbones, each a registry."""

from labelenc.models.backbones import BACKBONES, WeightsError, load_state_dict_file
from labelenc.models.detectors import FAMILIES, DetectorFamily, build_detector, family_of, head_losses

__all__ = ["BACKBONES", "FAMILIES", "DetectorFamily", "WeightsError", "build_detector", "family_of", "head_losses",
           "load_state_dict_file"]
