"""Data loaders for iteration-based training whose sample order and augmentation are a function of the seed.

Training reads an endless stream of sample positions ``0, 1, 2, ...``: position ``k`` is image
``permutation(seed, epoch)[k % n]`` with augmentation drawn from an RNG seeded by ``(seed, k)``. Resuming at
iteration ``i`` therefore restarts the stream at position ``i * global_batch`` and sees exactly the batches an
uninterrupted run would, whatever the number of workers or processes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from labelenc.config import Config
from labelenc.data.coco import CocoDetection
from labelenc.data.validate import check_data, report_problems
from labelenc.engine.distributed import is_main_process
from labelenc.errors import UserError

Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]


def collate(batch: list[tuple[torch.Tensor, dict]]) -> Batch:
    """Lists of plain tensors (no ``tv_tensors``): the detector's own transform resizes and pads them."""
    images = [image.as_subclass(torch.Tensor) for image, _ in batch]
    targets = [{k: v.as_subclass(torch.Tensor) for k, v in target.items()} for _, target in batch]
    return images, targets


class SeededStream(Dataset):
    """Maps a global sample position to (image, target) with a per-position shuffle and augmentation seed."""

    def __init__(self, dataset: CocoDetection, transforms: v2.Transform | None, seed: int) -> None:
        self.dataset = dataset
        self.transforms = transforms
        self.seed = seed
        self._epoch = -1
        self._order: list[int] = []

    def __len__(self) -> int:  # positions are unbounded; this is the epoch length
        return len(self.dataset)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, dict]:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.dataset), generator=generator).tolist()
            self._epoch = epoch
        image, target = self.dataset[self._order[offset]]
        if self.transforms is None:
            return image, target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + position + 1)
            return self.transforms(image, target)


class StreamSampler(Sampler[int]):
    """Endless positions ``start + rank, start + rank + world, ...`` for one process of ``world``."""

    def __init__(self, start: int, rank: int = 0, world_size: int = 1) -> None:
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start + self.rank, self.world_size)


def train_transforms(flip_prob: float) -> v2.Transform | None:
    """Training augmentation; boxes and masks are transformed by torchvision together with the image."""
    if flip_prob == 0:
        return None
    return v2.RandomHorizontalFlip(flip_prob)


def build_datasets(cfg: Config, with_masks: bool) -> tuple[CocoDetection, CocoDetection]:
    """Training and validation splits of ``cfg.data`` (COCO, VOC or YOLO), validated, with one category mapping.

    Every image header and annotation is checked first (:mod:`labelenc.data.validate`): warnings (clipped or
    dropped boxes) are logged one per line; errors, or warnings with ``data.strict``, raise
    :class:`~labelenc.data.problems.DataValidationError` listing every problem, before any training. The datasets
    hold the cleaned annotations only, so the training loop never meets one it cannot use.
    """
    checked = check_data(cfg, need_masks=with_masks, check_pixels=False)
    report_problems(checked, strict=cfg.data.strict, log=is_main_process())
    train_split, val_split = checked["train"], checked["val"]
    train = CocoDetection.from_dataset(
        train_split.dataset, train_split.image_dir, train_split.source, with_masks=with_masks
    )
    val = CocoDetection.from_dataset(
        val_split.dataset,
        val_split.image_dir,
        val_split.source,
        with_masks=False,
        categories=train.label_to_category[1:],
    )
    return train, val


def build_train_loader(
    dataset: CocoDetection, cfg: Config, start_iter: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Endless loader of per-process batches that resumes at ``start_iter`` with the same data order."""
    if cfg.train.batch_size % world_size:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {world_size} processes")
    batch = cfg.train.batch_size // world_size
    stream = SeededStream(dataset, train_transforms(cfg.data.flip_prob), cfg.train.seed)
    sampler = StreamSampler(start_iter * cfg.train.batch_size, rank, world_size)
    return DataLoader(
        stream,
        batch_size=batch,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(cfg.train.seed),  # keeps the global RNG untouched
    )


def build_eval_loader(dataset: CocoDetection, batch_size: int, num_workers: int) -> DataLoader:
    """Sequential loader over a split, for evaluation."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
