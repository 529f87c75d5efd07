"""Data in, (images, masks) out: masks, the shared augmentation, loaders, the sample dataset."""
from .augment import IMAGENET_MEAN, IMAGENET_STD, Augmentation, denormalize, normalize, sample_crop, sample_view
from .folder import ImageFolder, SampleList, scan_folder
from .loader import GlobalBatchMasks, Loader
from .loaders import BACKENDS, build_loader
from .masking import MaskGenerator, avg_dist, num_masked
from .options import DataConfig, LoaderSpec
from .reference import ReferenceLoader
from .sample_data import build_sample_dataset
from .sharding import ShardedSampler

__all__ = [
    "BACKENDS", "IMAGENET_MEAN", "IMAGENET_STD", "Augmentation", "CheckpointError", "ConfigError", "DataConfig",
    "DatasetError", "GlobalBatchMasks", "ImageFolder", "Loader", "LoaderSpec", "MaskGenerator", "ReferenceLoader",
    "SampleList", "ShardedSampler", "UserError", "avg_dist", "build_loader", "build_sample_dataset", "denormalize",
    "normalize", "num_masked", "sample_crop", "sample_view", "scan_folder",
]
