"""Tests of labelenc.data.loader: seeded sample stream, exact resume, rank sharding, flip augmentation, collate."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from labelenc.data.coco import CocoDetection
from labelenc.data.loader import Batch, SeededStream, StreamSampler, build_train_loader, collate, train_transforms


@pytest.fixture(scope="module")
def train_set(synth_root: Path) -> CocoDetection:
    """The 16-image synthetic training split, with instance masks."""
    return CocoDetection(synth_root / "annotations/instances_train.json", synth_root / "train", with_masks=True)


def _same_sample(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict]) -> bool:
    """Identical pixels and identical target tensors."""
    return torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def _same_batches(a: list[Batch], b: list[Batch]) -> bool:
    """Batches with identical images and identical targets, in the same order."""
    return len(a) == len(b) and all(
        len(ia) == len(ib) and all(_same_sample((x, s), (y, t)) for x, s, y, t in zip(ia, ta, ib, tb))
        for (ia, ta), (ib, tb) in zip(a, b)
    )


def test_stream_is_a_function_of_seed_and_position(train_set: CocoDetection) -> None:
    """Same seed and position give the same augmented sample in any access order, and the global RNG is untouched."""
    positions = [0, 5, 15, 16, 17, 40, 33]
    first = SeededStream(train_set, train_transforms(0.5), seed=3)
    state = torch.get_rng_state()
    forward = [first[p] for p in positions]
    assert torch.equal(torch.get_rng_state(), state)
    second = SeededStream(train_set, train_transforms(0.5), seed=3)
    backward = [second[p] for p in reversed(positions)][::-1]
    assert all(_same_sample(a, b) for a, b in zip(forward, backward))
    other = SeededStream(train_set, train_transforms(0.5), seed=4)
    other_ids = [int(other[p][1]["image_id"]) for p in range(len(train_set))]
    assert other_ids != [int(first[p][1]["image_id"]) for p in range(len(train_set))]


def test_order_is_a_fresh_permutation_each_epoch(train_set: CocoDetection) -> None:
    """Each epoch of the stream visits every image exactly once, in an order that changes between epochs."""
    stream = SeededStream(train_set, None, seed=0)
    n = len(train_set)
    orders = [[int(stream[e * n + k][1]["image_id"]) for k in range(n)] for e in range(3)]
    for order in orders:
        assert sorted(order) == sorted(train_set.image_ids)
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert orders[0] != sorted(train_set.image_ids)


def test_flip_is_drawn_per_position(train_set: CocoDetection) -> None:
    """With flip_prob 0.5 each position shows its image either as is or mirrored, and both happen."""
    plain = SeededStream(train_set, None, seed=1)
    flipped = SeededStream(train_set, train_transforms(0.5), seed=1)
    outcomes = []
    for p in range(len(train_set)):
        image, reference = flipped[p][0], plain[p][0]
        if torch.equal(image, reference):
            outcomes.append(False)
        else:
            assert torch.equal(image, reference.flip(-1))
            outcomes.append(True)
    assert any(outcomes) and not all(outcomes)


def test_horizontal_flip_keeps_boxes_and_masks_aligned(train_set: CocoDetection) -> None:
    """After train_transforms(1.0) pixels and masks are mirrored and each box is the tight box of its flipped mask."""
    assert train_transforms(0.0) is None
    flip = train_transforms(1.0)
    instances = 0
    for index in range(len(train_set)):
        image, target = train_set[index]
        out_image, out = flip(image, target)
        width = image.shape[-1]
        assert isinstance(out["boxes"], tv_tensors.BoundingBoxes) and isinstance(out["masks"], tv_tensors.Mask)
        assert torch.equal(out_image, image.flip(-1))
        assert torch.equal(out["masks"], target["masks"].flip(-1))
        assert torch.equal(out["labels"], target["labels"])
        for box, flipped_box, mask in zip(target["boxes"], out["boxes"], out["masks"]):
            rows, cols = torch.nonzero(mask.any(dim=1)).flatten(), torch.nonzero(mask.any(dim=0)).flatten()
            tight = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
            assert torch.equal(flipped_box.as_subclass(torch.Tensor), tight)
            assert flipped_box[0] == width - box[2] and flipped_box[2] == width - box[0]
            instances += 1
    assert instances > 10


def test_collate_gives_plain_tensors(train_set: CocoDetection) -> None:
    """collate returns lists of plain tensors (no tv_tensors subclasses) with the values unchanged."""
    samples = [train_set[0], train_set[1]]
    images, targets = collate(samples)
    assert len(images) == len(targets) == 2
    for image, target, (ref_image, ref_target) in zip(images, targets, samples):
        assert type(image) is torch.Tensor and torch.equal(image, ref_image)
        assert target.keys() == ref_target.keys()
        assert all(type(v) is torch.Tensor and torch.equal(v, ref_target[k]) for k, v in target.items())


def _batches(loader: torch.utils.data.DataLoader, count: int) -> list[Batch]:
    return list(itertools.islice(iter(loader), count))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_loader_yields_the_uninterrupted_batches(train_set: CocoDetection, tiny_config, num_workers: int) -> None:
    """A loader started at iteration k (any num_workers) yields exactly the batches k.. of one started at 0."""
    reference = _batches(build_train_loader(train_set, tiny_config(data={"flip_prob": 0.5}), start_iter=0), 10)
    assert len({int(t["image_id"]) for _, targets in reference[:8] for t in targets}) == len(train_set)  # one epoch
    cfg = tiny_config(data={"flip_prob": 0.5, "num_workers": num_workers})
    resumed = _batches(build_train_loader(train_set, cfg, start_iter=7), 3)  # crosses the epoch boundary
    assert _same_batches(resumed, reference[7:10])
    assert not _same_batches(resumed, reference[6:9])


def test_stream_sampler_shards_positions_without_overlap() -> None:
    """Ranks of one world together cover every position from the start exactly once."""
    world, start, per_rank = 3, 7, 20
    shards = [list(itertools.islice(StreamSampler(start, rank, world), per_rank)) for rank in range(world)]
    assert all(len(set(shard)) == per_rank for shard in shards)
    assert sorted(itertools.chain(*shards)) == list(range(start, start + world * per_rank))


def test_sharded_loaders_split_the_global_batch(train_set: CocoDetection, tiny_config) -> None:
    """With two processes each rank gets half of every global batch, the same samples a single process would see."""
    cfg = tiny_config(data={"flip_prob": 0.5})
    single = _batches(build_train_loader(train_set, cfg, start_iter=2), 3)
    ranks = [_batches(build_train_loader(train_set, cfg, start_iter=2, rank=r, world_size=2), 3) for r in range(2)]
    for i, (images, targets) in enumerate(single):
        assert all(len(ranks[r][i][0]) == 1 for r in range(2))
        merged = ([ranks[0][i][0][0], ranks[1][i][0][0]], [ranks[0][i][1][0], ranks[1][i][1][0]])
        assert _same_batches([merged], [(images, targets)])
