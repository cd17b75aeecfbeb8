"""Data loaders for iteration-based training whose sample order and augmentation are a function of the seed.

Training reads an endless stream of sample positions ``0, 1, 2, ...``: position ``k`` is image
``permutation(seed, epoch)[k % n]`` with augmentation drawn from an RNG seeded by ``(seed, k)``. Resuming at
iteration ``i`` therefore restarts the stream at position ``i * global_batch`` and sees exactly the batches an
uninterrupted run would, whatever the number of workers or processes.

With ``data.aspect_ratio_grouping`` (:class:`GroupedSeededStream`) every global batch holds images of one
orientation only; batch ``b`` (positions ``b * global_batch ...``) is still a function of ``(seed, b)`` alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from labelenc.config import Config
from labelenc.data.coco import CocoDetection
from labelenc.data.problems import DataError, Problem
from labelenc.data.validate import (
    CheckedSplit,
    _adopt_categories,
    _read_split,
    check_data,
    report_problems,
    validate_coco,
)
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

    def _generator(self, epoch: int) -> torch.Generator:
        """The RNG of one epoch; its first draw is the epoch's permutation of the images."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def index_at(self, position: int) -> int:
        """Dataset index of the image at ``position``: ``permutation(seed, epoch)[position % n]``."""
        epoch, offset = divmod(position, len(self.dataset))
        if epoch != self._epoch:
            self._order = torch.randperm(len(self.dataset), generator=self._generator(epoch)).tolist()
            self._epoch = epoch
        return self._order[offset]

    def __getitem__(self, position: int) -> tuple[torch.Tensor, dict]:
        image, target = self.dataset[self.index_at(position)]
        if self.transforms is None:
            return image, target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + position + 1)
            return self.transforms(image, target)


def is_portrait(dataset: CocoDetection) -> list[bool]:
    """Per dataset index: width < height, from the image sizes in the (validated) annotations; no image is opened."""
    return [dataset.coco.imgs[i]["width"] < dataset.coco.imgs[i]["height"] for i in dataset.image_ids]


class GroupedSeededStream(SeededStream):
    """:class:`SeededStream` whose global batches hold images of one orientation only (aspect-ratio grouping).

    The images of each orientation (group 0: width >= height, group 1: width < height) form an endless stream of
    their own: the group's images in the order of the epoch permutation of :class:`SeededStream`, epoch after epoch.
    Each group stream is cut into chunks of ``batch_size`` (the global batch). The batches of epoch ``e`` are the
    chunks that end within epoch ``e`` of their group, the chunks of each group in order, the two groups interleaved
    by a seeded shuffle (the epoch's RNG, after its permutation). So every image is used exactly once per epoch of
    its group, none is dropped or repeated, and the fewer than ``batch_size`` images left over at the end of an epoch
    open the group's first batch of the next epoch. Epoch ``e`` starts at batch ``e * L // B + e * P // B`` (``L``
    landscape and ``P`` portrait images, ``B`` the global batch), so batch ``b``, and hence position
    ``b * B + j``, is a pure function of ``(seed, b)``: resuming, workers and process ranks see the same batches as
    ever. Augmentation is still seeded by the position. On a dataset of one orientation the stream equals the
    ungrouped one.
    """

    _CACHED_EPOCHS = 4

    def __init__(self, dataset: CocoDetection, transforms: v2.Transform | None, seed: int, batch_size: int) -> None:
        super().__init__(dataset, transforms, seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self._portrait = is_portrait(dataset)
        portrait = sum(self._portrait)
        self.group_sizes = (len(self._portrait) - portrait, portrait)
        self._epochs: dict[int, tuple[tuple[list[int], list[int]], list[tuple[int, int]]]] = {}

    def batches_before(self, epoch: int) -> int:
        """Global batches of the epochs before ``epoch`` (a group's chunk belongs to the epoch it ends in)."""
        return sum(epoch * size // self.batch_size for size in self.group_sizes)

    def _epoch_data(self, epoch: int) -> tuple[tuple[list[int], list[int]], list[tuple[int, int]]]:
        """The epoch's images per group (permutation order) and its batches as (group, chunk of the group stream)."""
        if epoch not in self._epochs:
            generator = self._generator(epoch)
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
            groups = ([i for i in order if not self._portrait[i]], [i for i in order if self._portrait[i]])
            first = [epoch * size // self.batch_size for size in self.group_sizes]
            counts = [(epoch + 1) * size // self.batch_size - f for size, f in zip(self.group_sizes, first)]
            kinds = [0] * counts[0] + [1] * counts[1]
            shuffled = [kinds[k] for k in torch.randperm(len(kinds), generator=generator).tolist()]
            batches = []
            for group in shuffled:
                batches.append((group, first[group]))
                first[group] += 1
            if len(self._epochs) >= self._CACHED_EPOCHS:
                del self._epochs[next(iter(self._epochs))]
            self._epochs[epoch] = (groups, batches)
        return self._epochs[epoch]

    def epoch_of_batch(self, batch: int) -> int:
        """The epoch whose batches include global batch ``batch``."""
        epoch = batch * self.batch_size // len(self.dataset)  # batches_before(epoch) <= batch
        while self.batches_before(epoch + 1) <= batch:
            epoch += 1
        return epoch

    def index_at(self, position: int) -> int:
        batch, offset = divmod(position, self.batch_size)
        epoch = self.epoch_of_batch(batch)
        group, chunk = self._epoch_data(epoch)[1][batch - self.batches_before(epoch)]
        group_epoch, index = divmod(chunk * self.batch_size + offset, self.group_sizes[group])
        return self._epoch_data(group_epoch)[0][group][index]


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


def build_val_dataset(
    cfg: Config, class_names: Sequence[str], category_ids: Sequence[int], with_masks: bool = False,
    trained: str = "the model",
) -> CocoDetection:
    """The validation split of ``cfg.data`` alone, for a model trained on categories ``category_ids`` (label
    ``i + 1`` is ``category_ids[i]``) named ``class_names``: the training split is not read.

    The split is read and checked as :func:`build_datasets` checks it (the same readers and
    :func:`~labelenc.data.validate.validate_coco`, ``data.strict``), against the given categories instead of
    data.train's: a VOC / YOLO split takes them by class name; a COCO split must have the same category ids, else
    the :class:`~labelenc.data.problems.DataValidationError` names both sets (``trained`` says whose they are).
    ``with_masks``: the model is a mask detector, so every annotation needs a usable instance mask.
    """
    categories = sorted(({"id": int(i), "name": str(n)} for i, n in zip(category_ids, class_names, strict=True)),
                        key=lambda c: c["id"])
    split = cfg.data.val
    coco = split.format == "coco"
    source = str(split.annotations if coco else split.root)
    checked = CheckedSplit("val", source, Path(split.images if coco else split.root), None)
    problems = checked.problems
    if with_masks and not coco:
        problems.append(Problem("error", source, None, None, f"data.val.format={split.format} has boxes only; "
                                f"model.family={cfg.model.family} needs COCO instance masks"))
    else:
        names = split.class_names
        if split.format == "voc" and names is None:
            names = [c["name"] for c in categories]
        try:
            dataset = _read_split(split, names, problems)
        except DataError as err:
            problems.append(Problem("error", source, None, None, str(err)))
        else:
            if not coco:
                dataset = _adopt_categories(dataset, categories, "val", source, problems)
            checked.dataset, found = validate_coco(dataset, checked.image_dir, source, need_masks=with_masks)
            problems.extend(found)
            problems.extend(_other_categories_than(checked, categories, trained))
    report_problems({"val": checked}, strict=cfg.data.strict, log=is_main_process())
    return CocoDetection.from_dataset(checked.dataset, checked.image_dir, checked.source, with_masks=False,
                                      categories=[c["id"] for c in categories])


def _other_categories_than(split: CheckedSplit, categories: list[dict], trained: str) -> list[Problem]:
    """An error if the split's category ids are not those of the trained model, naming both."""
    own = sorted((c["id"], c["name"]) for c in split.dataset["categories"])
    if [i for i, _ in own] == [c["id"] for c in categories]:
        return []

    def listed(pairs: list[tuple[int, str]]) -> str:
        return "[" + ", ".join(f"{i} {name!r}" for i, name in pairs) + "]"

    return [Problem("error", split.source, None, None, f"data.{split.name}'s categories differ from the ones "
                    f"{trained} was trained on: data.{split.name} has {listed(own)}, {trained} "
                    f"{listed([(c['id'], c['name']) for c in categories])}; evaluation needs the training categories")]


def build_train_loader(
    dataset: CocoDetection, cfg: Config, start_iter: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Endless loader of per-process batches that resumes at ``start_iter`` with the same data order.

    Rank ``r`` of ``world_size`` gets positions ``r, r + world_size, ...`` of each global batch; with
    ``data.aspect_ratio_grouping`` each global batch is of one orientation (:class:`GroupedSeededStream`).
    """
    if cfg.train.batch_size % world_size:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {world_size} processes")
    batch = cfg.train.batch_size // world_size
    transforms = train_transforms(cfg.data.flip_prob)
    if cfg.data.aspect_ratio_grouping:
        stream = GroupedSeededStream(dataset, transforms, cfg.train.seed, cfg.train.batch_size)
    else:
        stream = SeededStream(dataset, transforms, cfg.train.seed)
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
