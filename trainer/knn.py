"""kNN monitor during pre-training (`run.knn_every`): weighted k-NN top-1 of the encoder's pooled features.

Every `run.knn_every` epochs the current encoder (no mask: every cell visible) embeds a fixed subset of
up to `run.knn_train_samples` training images and every image of `data.val_path`, both in the
evaluation view (resize + centre crop); each validation image is classified by the k = 20 nearest
training features under cosine similarity, each neighbour voting for its class with weight
exp(similarity / 0.07) (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", Sec. 3.4; DINO's eval_knn.py protocol, Caron et al. 2021). The features are the mean
over the encoder's output grid (Swin: the last stage after its norm; ViT: the patch tokens after the
final norm). Every rank embeds its share (indices rank::world_size, so no image twice), the training
features are gathered on every rank, and the hits are summed: the figure does not depend on the
number of ranks. Needs labelled data: class folders or `path label` lists for data.path and
data.val_path, read by the torch backend's ImageFolder whatever data.backend is (with ffcv's .beton
files or stream shards the pre-training task builds no monitor and says so: `PretrainTask.knn_monitor`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from simmim.core.errors import ConfigError
from simmim.pipeline.augment import Augmentation, normalize
from simmim.pipeline.folder import ImageFolder, read_file_list, scan_folder

from .distributed import DistInfo, all_reduce_sum
from .finetune import class_map
from .parallel import lockstep
from .precision import autocast

log = logging.getLogger("simmim")
K, TEMPERATURE = 20, 0.07  # InstDisc / DINO


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                num_classes: int, k: int = K, temperature: float = TEMPERATURE, chunk: int = 256) -> torch.Tensor:
    """Weighted k-NN classes. train_features (N, C), train_labels (N,) int64 in [0, num_classes),
    features (M, C) (any float dtype; L2-normalised here, so the dot product is cosine similarity).
    Returns (M,) int64: argmax over classes of sum over the k nearest neighbours (k capped at N) of
    exp(cos / temperature) for the neighbour's class (InstDisc Sec. 3.4, DINO). Queries go in chunks
    of `chunk` rows to bound the (chunk, N) similarity matrix."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, len(bank))
    out = []
    for part in F.normalize(features.float(), dim=1).split(chunk):
        sim, idx = (part @ bank.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(len(part), num_classes, device=part.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=features.device)


@torch.no_grad()
def pooled_features(encoder, images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images (B, 3, H, W) normalised -> (B, C) float32: the encoder's output (B, C, h, w) with no cell
    masked, averaged over the grid."""
    masks = torch.zeros(len(images), images.shape[2] // patch_size, images.shape[3] // patch_size,
                        dtype=torch.bool, device=images.device)
    return encoder(images, masks).float().mean(dim=(2, 3))


def labelled(path: str, key: str, channels: int = 3):
    """(SampleList, classes) of a class folder or a `path label` list; ConfigError when unlabeled."""
    samples, classes = read_file_list(Path(path)) if Path(path).is_file() else \
        scan_folder(path, announce=log.debug, channels=channels)
    if not classes and int(samples.labels.max(initial=0)) == 0:
        raise ConfigError(f"{key} '{path}' is unlabeled: run.knn_every needs class folders (or a `path label` list) "
                          f"for data.path and data.val_path; set run.knn_every=0")
    return samples, classes


class KNNMonitor:
    """Builds the two fixed image sets once (see the module docstring); `__call__(model)` -> top-1 %."""

    def __init__(self, data_path: str, val_path: str, img_size: int, patch_size: int, train_samples: int,
                 batch_size: int, num_workers: int, seed: int, dist: DistInfo, aug: Augmentation | None = None,
                 channels: int = 3):
        """aug: the run's normalisation (mean / std per channel; default ImageNet's), channels: data.channels."""
        train, classes = labelled(data_path, "data.path", channels)
        val, val_classes = labelled(val_path, "data.val_path", channels)

        self.to_train = class_map(val_classes, classes, len(classes) or int(train.labels.max()) + 1, "data.val_path")
        self.num_classes = len(classes) or int(max(train.labels.max(), val.labels.max())) + 1
        self.aug = aug = Augmentation(size=img_size) if aug is None else aug
        self.train_set = ImageFolder(data_path, aug, train=False, listed=(train, classes), channels=channels)
        self.val_set = ImageFolder(val_path, aug, train=False, listed=(val, val_classes), channels=channels)
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:train_samples]
        self.train_idx = pick.sort().values[dist.rank::dist.world_size].tolist()  # sorted: files read in order
        self.val_idx = list(range(dist.rank, len(val), dist.world_size))
        self.total_train = min(train_samples, len(train))
        self.patch_size, self.batch_size, self.num_workers, self.dist = patch_size, batch_size, num_workers, dist

    def _features(self, model, dataset, indices, amp_dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.dist.device
        loader = torch.utils.data.DataLoader(_Subset(dataset, indices), batch_size=self.batch_size,
                                             num_workers=self.num_workers)
        feats, labels = [], []
        for (images, y), real in lockstep(loader, model, device):
            images = images.to(device, non_blocking=True)  # uint8 RGB, or normalised float (data.channels != 3)
            images = normalize(images, self.aug.mean, self.aug.std) if images.dtype == torch.uint8 else images
            with autocast(device.type, amp_dtype):
                f = pooled_features(model.encoder, images, self.patch_size)
            if real:
                feats.append(f)
                labels.append(y.to(device))
        width = model.encoder.num_features
        return (torch.cat(feats) if feats else torch.zeros(0, width, device=device),
                torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device))

    @torch.no_grad()
    def __call__(self, model, amp_dtype=None) -> float:
        """Weighted k-NN top-1 (%) of `model`'s encoder on data.val_path; every rank must call it.
        `model`: the SimMIM model, possibly inside DDP (`.module`) or torch.compile (`._orig_mod`)."""
        while not hasattr(model, "encoder"):
            model = getattr(model, "module", None) or model._orig_mod
        was = model.training
        model.eval()
        bank, bank_labels = (gather(t) for t in self._features(model, self.train_set, self.train_idx, amp_dtype))
        feats, labels = self._features(model, self.val_set, self.val_idx, amp_dtype)
        model.train(was)
        if self.to_train is not None:
            labels = self.to_train.to(labels.device)[labels]
        hits = (knn_predict(bank, bank_labels, feats, self.num_classes) == labels).sum()
        total = all_reduce_sum(torch.stack([hits.double(), torch.tensor(len(labels), dtype=torch.float64,
                                                                           device=hits.device)]))
        return 100.0 * total[0].item() / max(total[1].item(), 1.0)


class _Subset(torch.utils.data.Dataset):
    """Samples `indices` of an ImageFolder in the evaluation view: (uint8 (3, S, S), label)."""

    def __init__(self, dataset: ImageFolder, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[(self.indices[i], 0)]


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (rows may differ in number), concatenated in rank order; `t` itself alone."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return t
    n = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros(most, *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[:len(t)] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    torch_dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])
