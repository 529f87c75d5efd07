"""The pipelines a user would write without this project, for `simmim bench loaders` to run beside ours.

Each reads the same images (or the same .beton) at the same output size, batch and workers as our
loaders, and yields what ours yield to the trainer: float (B, 3, S, S) images normalised with the
ImageNet mean/std on the training device (and, for the released SimMIM loader, its masks):

    torchvision       ImageFolder + RandomResizedCrop(S, scale (0.67, 1)) + flip + ToTensor +
                      Normalize in DataLoader workers (what timm's and torchvision's recipes do)
    released SimMIM   the transform of the SimMIM paper's released code (microsoft/SimMIM,
                      data/data_simmim.py, restated here): the torchvision transform above and a
                      per-image numpy mask (ceil(0.6 * cells) of the 32 px cells, drawn with
                      np.random.permutation, repeated to the model's 4 px patch grid) in the workers
    ffcv              FFCV's own RandomResizedCropRGBImageDecoder + RandomHorizontalFlip + ToTensor +
                      ToTorchImage (+ ToDevice) on the same .beton (ffcv-imagenet's training pipeline);
                      normalised by FFCV's NormalizeImage on the CPU, by torch on a GPU (FFCV's GPU
                      normaliser needs cupy)
    dali              fn.readers.file + fn.decoders.image_random_crop + fn.resize +
                      fn.crop_mirror_normalize (DALI's ResNet-50 example's training pipeline), on the
                      CPU (device_id=None) or with 'mixed' decoding (nvJPEG, `hw_decoder_load`)
    streaming         MosaicML streaming's StreamingDataset over the same shards (`simmim shard`),
                      shuffled, each sample's stored JPEG opened by PIL and given the torchvision
                      transform above in DataLoader workers (streaming's own image examples)

None draws its crops per sample from (seed, epoch, index) or resumes mid-epoch: they are the
baseline our exactness is paid against. Every class has `set_epoch(epoch)` (a no-op where the
library reshuffles by itself) and yields `(images, masks or None)` per batch.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets import ImageFolder

from simmim.pipeline.augment import Augmentation, normalize
from simmim.pipeline.ffcv_compat import keep_torch_threads


class PlainTorchvision:
    """torchvision's ImageFolder + transforms in a DataLoader (`released=True`: with the released
    SimMIM mask generator in the workers). Shuffled by the DataLoader, last partial batch dropped,
    persistent workers, pinned memory on a GPU."""

    def __init__(self, root: str, aug: Augmentation, batch_size: int, workers: int, device: torch.device,
                 released: bool = False):
        image = T.Compose([T.RandomResizedCrop(aug.size, scale=aug.scale, ratio=aug.ratio),
                           T.RandomHorizontalFlip(aug.hflip), T.ToTensor(), T.Normalize(aug.mean, aug.std)])
        transform = ReleasedSimMIMTransform(image, aug.size) if released else image
        dataset = ImageFolder(root, transform=transform)
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for x, _ in self.loader:
            images, masks = x if isinstance(x, (list, tuple)) else (x, None)
            images = images.to(self.device, non_blocking=True)
            yield images, None if masks is None else masks.to(self.device, non_blocking=True)


class ReleasedSimMIMTransform:
    """The released SimMIM loader's per-image work: `image(img)` and a mask of the 32 px cells, of
    which ceil(ratio * cells) are set, picked by a numpy permutation of the process's global
    generator, then repeated to the model's patch grid (4 px for Swin: 48 x 48 int64 at 192 px).
    Returns (image, mask)."""

    def __init__(self, image, size: int, cell: int = 32, model_patch: int = 4, ratio: float = 0.6):
        self.image, self.cells_per_side, self.repeat = image, size // cell, cell // model_patch
        self.cells = self.cells_per_side ** 2
        self.masked = math.ceil(self.cells * ratio)

    def __call__(self, img):
        chosen = np.random.permutation(self.cells)[:self.masked]
        mask = np.zeros(self.cells, dtype=int)
        mask[chosen] = 1
        grid = mask.reshape(self.cells_per_side, self.cells_per_side)
        return self.image(img.convert("RGB")), np.repeat(np.repeat(grid, self.repeat, 0), self.repeat, 1)


class PlainFFCV:
    """FFCV's own random-resized-crop pipeline on a .beton (see the module docstring)."""

    def __init__(self, beton: str, aug: Augmentation, batch_size: int, workers: int, device: torch.device):
        keep_torch_threads()  # FFCV's import would set torch's thread count for the whole process
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        self.aug, self.device = aug, device
        image = [RandomResizedCropRGBImageDecoder((aug.size, aug.size), scale=aug.scale, ratio=aug.ratio),
                 RandomHorizontalFlip(aug.hflip)]
        self.on_cpu = device.type == "cpu"
        if self.on_cpu:
            image.append(NormalizeImage(255 * np.array(aug.mean), 255 * np.array(aug.std), np.float32))
        image += [ToTensor()] + ([] if self.on_cpu else [ToDevice(device, non_blocking=True)]) + [ToTorchImage()]
        self.loader = Loader(beton, batch_size=batch_size, num_workers=max(1, workers), order=OrderOption.RANDOM,
                             drop_last=True, pipelines={"image": image, "label": None})

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for (images,) in self.loader:
            if not self.on_cpu:
                images = normalize(images, self.aug.mean, self.aug.std)
            yield images, None


class PlainDALI:
    """DALI's file reader + random-crop decoder + resize + crop_mirror_normalize (module docstring).
    device 'cpu' (device_id=None) or 'mixed'; hw_decoder_load: the share sent to the hardware
    JPEG decoder (A100/H100) in mixed mode."""

    def __init__(self, root: str, aug: Augmentation, batch_size: int, workers: int, device: torch.device,
                 dali_device: str = "cpu", hw_decoder_load: float = 0.0, seed: int = 0):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        decoder = {"device": "mixed", "hw_decoder_load": hw_decoder_load} if dali_device == "mixed" else {}

        @pipeline_def
        def pipe():
            jpegs, labels = fn.readers.file(file_root=root, random_shuffle=True, name="Reader")
            images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=list(aug.scale),
                                                   random_aspect_ratio=list(aug.ratio), **decoder)
            images = fn.resize(images, resize_x=aug.size, resize_y=aug.size)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[255 * m for m in aug.mean], std=[255 * s for s in aug.std],
                                              mirror=fn.random.coin_flip(probability=aug.hflip))
            return images, labels

        device_id = (device.index or 0) if dali_device == "mixed" else None
        self.pipe = pipe(batch_size=batch_size, num_threads=max(1, workers), device_id=device_id, seed=seed)
        self.pipe.build()
        self.iterator = DALIGenericIterator(self.pipe, ["images", "labels"], reader_name="Reader",
                                            last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
        self.device = device

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for out in self.iterator:
            yield out[0]["images"].to(self.device, non_blocking=True), None


class PlainStreaming:
    """MosaicML streaming's StreamingDataset + PIL + torchvision's transform in a DataLoader (module
    docstring): `path` a shard folder, or an s3:// prefix cached in `cache` (its own folder:
    streaming refuses two live data sets on one)."""

    def __init__(self, path: str, aug: Augmentation, batch_size: int, workers: int, device: torch.device,
                 cache: str | None = None):
        from streaming import StreamingDataset

        remote = path if "://" in path else None
        shards = StreamingDataset(remote=remote, local=cache if remote else path, shuffle=True, batch_size=batch_size)
        image = T.Compose([T.RandomResizedCrop(aug.size, scale=aug.scale, ratio=aug.ratio),
                           T.RandomHorizontalFlip(aug.hflip), T.ToTensor(), T.Normalize(aug.mean, aug.std)])
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            _Decoded(shards, image), batch_size=batch_size, num_workers=workers, drop_last=True,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for images in self.loader:
            yield images.to(self.device, non_blocking=True), None


class _Decoded(torch.utils.data.IterableDataset):
    """A StreamingDataset's samples (dicts with the stored file under 'image') as transformed images."""

    def __init__(self, shards, transform):
        self.shards, self.transform = shards, transform

    def __iter__(self):
        for sample in self.shards:
            yield self.transform(Image.open(io.BytesIO(sample["image"])).convert("RGB"))
