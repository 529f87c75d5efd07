"""Data in, (images, masks) out: masks, the shared augmentation, loaders, the sample dataset."""
from .augment import IMAGENET_MEAN, IMAGENET_STD, Augmentation, denormalize, normalize, sample_crop
from .errors import DatasetError, UserError
from .folder import ImageFolder, SampleList, ShardedSampler, scan_folder
from .loaders import BACKENDS, build_loader
from .masking import MaskGenerator, avg_dist, num_masked
from .reference import ReferenceLoader
from .sample_data import build_sample_dataset

__all__ = [
    "BACKENDS", "IMAGENET_MEAN", "IMAGENET_STD", "Augmentation", "DatasetError", "ImageFolder", "MaskGenerator",
    "ReferenceLoader", "SampleList", "ShardedSampler", "avg_dist", "build_loader", "build_sample_dataset", "denormalize",
    "normalize", "num_masked", "sample_crop", "scan_folder", "UserError",
]
