"""Prediction on images and folders: the Predictor, test-time augmentation, and the files
``maskrcnn predict`` reads and writes."""

from maskrcnn.inference.predictor import Prediction, Predictor
from maskrcnn.inference.tta import TTAConfig

__all__ = ["Prediction", "Predictor", "TTAConfig"]
