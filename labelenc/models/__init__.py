"""torchvision detectors and the adapter calls LabelEnc needs."""

from labelenc.models.backbones import WeightsError, load_state_dict_file
from labelenc.models.detectors import FAMILIES, Family, build_detector, family_of, head_losses

__all__ = ["FAMILIES", "Family", "WeightsError", "build_detector", "family_of", "head_losses", "load_state_dict_file"]
