"""Image-classification data for bimask-hf: named, Hub and local datasets with recipe transforms.

The entry point is :func:`load_image_classification_data`; everything it raises for a bad request is a
:class:`DataError`.
"""

from .errors import DataError
from .loading import ImageClassificationData, load_image_classification_data
from .sources import KNOWN_DATASETS
from .transforms import RECIPES, collate_image_batch

__all__ = [
    "KNOWN_DATASETS",
    "RECIPES",
    "DataError",
    "ImageClassificationData",
    "collate_image_batch",
    "load_image_classification_data",
]
