"""Tests of labelenc.data.loader: seeded sample stream, exact resume, rank sharding, flip augmentation, collate,
aspect-ratio grouping."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from labelenc.data.coco import CocoDetection
from labelenc.data.loader import (
    Batch,
    GroupedSeededStream,
    SeededStream,
    StreamSampler,
    build_train_loader,
    collate,
    is_portrait,
    train_transforms,
)


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


# ------------------------------------------------------------------------------------------- aspect-ratio grouping

LANDSCAPE, PORTRAIT = 11, 7  # neither a multiple of the batch: leftovers are carried over


@pytest.fixture(scope="module")
def two_shape_set(tmp_path_factory: pytest.TempPathFactory) -> CocoDetection:
    """A COCO split of 11 landscape (40 x 24) and 7 portrait (24 x 40) PNGs, shuffled ids, one box each."""
    root = tmp_path_factory.mktemp("two_shapes")
    rng = random.Random(0)
    shapes = [(40, 24)] * LANDSCAPE + [(24, 40)] * PORTRAIT
    rng.shuffle(shapes)
    images, annotations = [], []
    for k, (width, height) in enumerate(shapes):
        image_id = 3 * k + 5
        pixels = bytes(rng.randrange(256) for _ in range(width * height * 3))
        Image.frombytes("RGB", (width, height), pixels).save(root / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
        annotations.append({"id": k + 1, "image_id": image_id, "category_id": 1, "bbox": [2, 3, 10, 12],
                            "area": 120, "iscrowd": 0})
    dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (root / "instances.json").write_text(json.dumps(dataset))
    return CocoDetection(root / "instances.json", root)


def _portrait_ids(dataset: CocoDetection) -> set[int]:
    return {i for i, portrait in zip(dataset.image_ids, is_portrait(dataset)) if portrait}


def _ids(batch: Batch) -> list[int]:
    return [int(t["image_id"]) for t in batch[1]]


def test_grouping_is_off_by_default_and_off_is_the_ungrouped_stream(two_shape_set: CocoDetection, tiny_config) -> None:
    """Default off; then the loader yields permutation(seed, epoch)[k % n] at position k, batches of mixed shapes."""
    cfg = tiny_config(data={"flip_prob": 0.0}, train={"batch_size": 4, "seed": 7})
    assert cfg.data.aspect_ratio_grouping is False
    n, batches = len(two_shape_set), _batches(build_train_loader(two_shape_set, cfg, start_iter=0), 12)
    orders = [torch.randperm(n, generator=torch.Generator().manual_seed(7 * 1_000_003 + e)).tolist() for e in range(3)]
    expected = [two_shape_set.image_ids[orders[k // n][k % n]] for k in range(12 * 4)]
    assert list(itertools.chain(*map(_ids, batches))) == expected
    portrait = _portrait_ids(two_shape_set)
    assert any(len({i in portrait for i in _ids(b)}) == 2 for b in batches)


def test_orientation_comes_from_the_annotations(two_shape_set: CocoDetection) -> None:
    """is_portrait reads the recorded sizes (width < height), which match the pixels."""
    assert sum(is_portrait(two_shape_set)) == PORTRAIT
    for index, portrait in enumerate(is_portrait(two_shape_set)):
        height, width = two_shape_set[index][0].shape[-2:]
        assert portrait == (width < height)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 8, 25])
def test_grouped_stream_is_one_orientation_per_batch_and_every_image_once_per_epoch(
    two_shape_set: CocoDetection, batch_size: int
) -> None:
    """Each global batch is of one orientation; each group's images, in stream order, are one permutation after
    another (nothing dropped or repeated, leftovers carried over, even for a group smaller than a batch); every
    position is a function of (seed, position) alone, in any access order."""
    stream = GroupedSeededStream(two_shape_set, None, seed=3, batch_size=batch_size)
    portrait = is_portrait(two_shape_set)
    num_batches = stream.batches_before(6)
    assert num_batches == sum(6 * size // batch_size for size in (LANDSCAPE, PORTRAIT))
    indices = [stream.index_at(k) for k in range(num_batches * batch_size)]
    for b in range(num_batches):
        assert len({portrait[i] for i in indices[b * batch_size:(b + 1) * batch_size]}) == 1
    for group, size in ((False, LANDSCAPE), (True, PORTRAIT)):
        members = sorted(i for i, p in enumerate(portrait) if p == group)
        sequence = [i for i in indices if portrait[i] == group]
        assert len(sequence) == 6 * size // batch_size * batch_size  # the chunks ending in epochs 0..5
        for epoch in range(len(sequence) // size):
            block = sequence[epoch * size:(epoch + 1) * size]
            assert sorted(block) == members
    if batch_size < PORTRAIT:  # the order of the batches mixes the groups
        kinds = [portrait[indices[b * batch_size]] for b in range(num_batches)]
        assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)
    positions = list(range(len(indices)))
    random.Random(batch_size).shuffle(positions)
    fresh = GroupedSeededStream(two_shape_set, None, seed=3, batch_size=batch_size)
    assert all(fresh.index_at(k) == indices[k] for k in positions)
    other = GroupedSeededStream(two_shape_set, None, seed=4, batch_size=batch_size)
    assert [other.index_at(k) for k in range(len(indices))] != indices


@pytest.mark.parametrize("num_workers", [0, 2])
def test_grouped_loader_resumes_with_any_workers(two_shape_set: CocoDetection, tiny_config, num_workers: int) -> None:
    """Grouped global batches have images of one shape; a loader started at iteration 5 (0 or 2 workers) yields
    the batches 5.. of an uninterrupted one, across the epoch boundary at batch 8."""
    train = {"batch_size": 4}
    cfg = tiny_config(data={"flip_prob": 0.5, "aspect_ratio_grouping": True}, train=train)
    reference = _batches(build_train_loader(two_shape_set, cfg, start_iter=0), 10)
    shapes = [{tuple(image.shape) for image in images} for images, _ in reference]
    assert all(len(s) == 1 for s in shapes) and len(set().union(*shapes)) == 2
    assert GroupedSeededStream(two_shape_set, None, 0, 4).batches_before(2) == 8
    grouped = dict(aspect_ratio_grouping=True, flip_prob=0.5, num_workers=num_workers)
    resumed = _batches(build_train_loader(two_shape_set, tiny_config(data=grouped, train=train), start_iter=5), 5)
    assert _same_batches(resumed, reference[5:10])
    assert not _same_batches(resumed, reference[4:9])


def test_grouped_sharded_loaders_split_the_global_batch(two_shape_set: CocoDetection, tiny_config) -> None:
    """Over two simulated ranks the per-rank slices, put back together, are the single-process global batches."""
    cfg = tiny_config(data={"flip_prob": 0.5, "aspect_ratio_grouping": True}, train={"batch_size": 4})
    single = _batches(build_train_loader(two_shape_set, cfg, start_iter=3), 6)
    ranks = [_batches(build_train_loader(two_shape_set, cfg, start_iter=3, rank=r, world_size=2), 6) for r in range(2)]
    for i, global_batch in enumerate(single):
        assert all(len(ranks[r][i][0]) == 2 for r in range(2))
        merged = tuple([ranks[j % 2][i][part][j // 2] for j in range(4)] for part in range(2))  # positions r, r + 2
        assert _same_batches([merged], [global_batch])
        assert len({tuple(image.shape) for image in global_batch[0]}) == 1


def test_grouping_a_set_of_one_orientation_changes_nothing(train_set: CocoDetection, tiny_config) -> None:
    """On the square synthetic set (all width >= height) the grouped stream is the ungrouped one, augmentation too."""
    plain = _batches(build_train_loader(train_set, tiny_config(data={"flip_prob": 0.5}), start_iter=3), 10)
    cfg = tiny_config(data={"flip_prob": 0.5, "aspect_ratio_grouping": True})
    assert _same_batches(_batches(build_train_loader(train_set, cfg, start_iter=3), 10), plain)
