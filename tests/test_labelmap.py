import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labelenc.labelmap import render_label_maps


def oracle(boxes, labels, num_classes, height, width, masks=None, factors=None):
    """The authors' way: a Python loop over boxes, each evaluated on the full H x W grid."""
    out = torch.zeros(len(boxes), num_classes, height, width)
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    box_index = 0
    for i, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        for k, (x1, y1, x2, y2) in enumerate(image_boxes.float()):
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
            if w > 0 and h > 0:
                v = 1 - torch.maximum((xs - cx).abs() / w, (ys - cy).abs() / h)
                v = torch.where(v >= 0.5, v, 0)
                if masks is not None:
                    mask = masks[i][k][:height, :width].float()
                    padded = torch.zeros(height, width)
                    padded[: mask.shape[0], : mask.shape[1]] = mask
                    v = v * padded
                if factors is not None:
                    v = v * factors[box_index]
                c = image_labels[k]
                out[i, c] = torch.maximum(out[i, c], v)
            box_index += 1
    return out


def random_boxes(n, height, width, g):
    """Boxes of all sizes (some sub-pixel, some degenerate), partly outside the frame, half with integer corners."""
    x1 = (torch.rand(n, generator=g) * 1.5 - 0.25) * width
    y1 = (torch.rand(n, generator=g) * 1.5 - 0.25) * height
    bw = torch.rand(n, generator=g) ** 2 * width * 0.8 - 0.05 * width
    bh = torch.rand(n, generator=g) ** 2 * height * 0.8 - 0.05 * height
    boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], 1)
    integer = torch.rand(n, generator=g) < 0.5
    return torch.where(integer[:, None], boxes.round(), boxes)


def random_batch(seed, num_images=3, num_classes=4, height=23, width=31, max_boxes=12):
    g = torch.Generator().manual_seed(seed)
    counts = [int(c) for c in torch.randint(0, max_boxes + 1, (num_images,), generator=g)]
    counts[0] = 0  # always one image without boxes
    boxes = [random_boxes(k, height, width, g) for k in counts]
    labels = [torch.randint(0, num_classes, (k,), generator=g) for k in counts]
    return boxes, labels


def assert_valid_values(maps):
    assert torch.all((maps == 0) | ((maps >= 0.5) & (maps <= 1)))


def test_hand_computed_values():
    maps = render_label_maps([torch.tensor([[0.0, 0.0, 4.0, 2.0]])], [torch.tensor([1])], 2, 4, 6)
    expected = torch.zeros(2, 4, 6)
    expected[1, :3, :5] = torch.tensor(
        [[0.5, 0.5, 0.5, 0.5, 0.5], [0.5, 0.75, 1.0, 0.75, 0.5], [0.5, 0.5, 0.5, 0.5, 0.5]]
    )
    assert torch.equal(maps[0], expected)


@pytest.mark.parametrize("seed", range(8))
def test_equals_oracle_on_random_boxes(seed):
    boxes, labels = random_batch(seed)
    maps = render_label_maps(boxes, labels, 4, 23, 31)
    assert maps.shape == (3, 4, 23, 31)
    assert maps.dtype == torch.float32
    assert torch.equal(maps, oracle(boxes, labels, 4, 23, 31))
    assert_valid_values(maps)


def test_overlaps_take_max_per_class():
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 10.0, 10.0], [1.0, 1.0, 9.0, 9.0]])]
    labels = [torch.tensor([0, 0, 1])]
    maps = render_label_maps(boxes, labels, 2, 12, 12)
    assert torch.equal(maps, oracle(boxes, labels, 2, 12, 12))
    assert maps[0, 0, 4, 4] == 1 and maps[0, 0, 6, 6] == 1  # both same-class centres survive
    assert maps[0, 1, 5, 5] == 1  # the other class lives in its own channel


def test_tiny_boxes_cover_at_most_one_pixel():
    boxes = [torch.tensor([[2.0, 2.0, 2.5, 2.5], [4.6, 4.6, 4.9, 4.9], [5.8, 1.8, 6.2, 2.2], [3.0, 3.0, 3.0, 4.0]])]
    labels = [torch.tensor([0, 1, 2, 3])]
    maps = render_label_maps(boxes, labels, 4, 8, 8)
    assert torch.equal(maps, oracle(boxes, labels, 4, 8, 8))
    assert [int((m > 0).sum()) for m in maps[0]] == [1, 0, 1, 0]


def test_boxes_crossing_the_border():
    boxes = [torch.tensor([[-5.0, -3.0, 4.0, 3.0], [6.5, 5.5, 20.0, 30.0], [-10.0, -10.0, 30.0, 30.0]])]
    labels = [torch.tensor([0, 1, 2])]
    maps = render_label_maps(boxes, labels, 3, 9, 10)
    assert torch.equal(maps, oracle(boxes, labels, 3, 9, 10))
    assert maps[0, 0, 0, 0] == pytest.approx(1 - 0.5 / 9) and maps[0, 0, :4, :5].min() == 0.5
    assert maps[0, 0, 4:].max() == 0 and maps[0, 0, :, 5:].max() == 0
    assert maps[0, 1, 8, 9] > 0.5 and maps[0, 1, :, :7].max() == 0
    assert maps[0, 2].min() > 0.5  # a box larger than the frame covers all of it


def test_float_rounding_at_the_box_border_follows_the_formula():
    just_above_one = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item()
    boxes = [torch.tensor([[just_above_one, just_above_one, 3.25, 3.25]])]
    maps = render_label_maps(boxes, [torch.tensor([0])], 1, 6, 6)
    assert maps[0, 0, 1, 1] == 0.5  # column/row 1 lie outside the box, yet the float32 formula gives exactly 0.5
    assert torch.equal(maps, oracle(boxes, [torch.tensor([0])], 1, 6, 6))


def test_degenerate_boxes_contribute_nothing():
    boxes = [torch.tensor([[3.0, 3.0, 3.0, 6.0], [3.0, 3.0, 6.0, 3.0], [6.0, 6.0, 2.0, 2.0], [5.0, 1.0, 5.0, 1.0]])]
    maps = render_label_maps(boxes, [torch.tensor([0, 0, 1, 1])], 2, 8, 8)
    assert maps.count_nonzero() == 0


def test_no_boxes_and_no_images():
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    maps = render_label_maps(empty, [torch.zeros(0, dtype=torch.long)] * 2, 3, 5, 7)
    assert maps.shape == (2, 3, 5, 7) and maps.count_nonzero() == 0
    assert render_label_maps([], [], 3, 5, 7).shape == (0, 3, 5, 7)
    assert render_label_maps([], [], 3, 5, 7, classes=torch.tensor([2])).shape == (0, 1, 5, 7)


@pytest.mark.parametrize("seed", range(4))
def test_masks_multiply_values(seed):
    boxes, labels = random_batch(seed, height=20, width=24)
    g = torch.Generator().manual_seed(100 + seed)
    mask_sizes = [(20, 24), (13, 24), (17, 9)]
    masks = [torch.rand(len(b), h, w, generator=g) < 0.7 for b, (h, w) in zip(boxes, mask_sizes)]
    maps = render_label_maps(boxes, labels, 4, 20, 24, masks=masks)
    assert torch.equal(maps, oracle(boxes, labels, 4, 20, 24, masks=masks))
    assert_valid_values(maps)
    assert maps[2, :, 17:].count_nonzero() == 0 and maps[2, :, :, 9:].count_nonzero() == 0
    as_uint8 = render_label_maps(boxes, labels, 4, 20, 24, masks=[m.to(torch.uint8) for m in masks])
    assert torch.equal(as_uint8, maps)


def test_classes_selects_and_orders_channels():
    boxes, labels = random_batch(3, num_classes=6)
    dense = render_label_maps(boxes, labels, 6, 23, 31)
    for classes in ([5, 0, 2], [3], [1, 4], list(range(6))[::-1]):
        classes = torch.tensor(classes)
        assert torch.equal(render_label_maps(boxes, labels, 6, 23, 31, classes=classes), dense[:, classes])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_equals_oracle_cast(dtype):
    boxes, labels = random_batch(5)
    maps = render_label_maps(boxes, labels, 4, 23, 31, dtype=dtype)
    assert maps.dtype == dtype
    assert torch.equal(maps, oracle(boxes, labels, 4, 23, 31).to(dtype))


def test_jitter_matches_oracle_with_the_same_draws():
    boxes, labels = random_batch(7, max_boxes=20)
    num_boxes = sum(len(b) for b in boxes)
    maps = render_label_maps(boxes, labels, 4, 23, 31, box_jitter=True, generator=torch.Generator().manual_seed(0))
    again = render_label_maps(boxes, labels, 4, 23, 31, box_jitter=True, generator=torch.Generator().manual_seed(0))
    factors = (2 * torch.rand(num_boxes, generator=torch.Generator().manual_seed(0))).clamp(max=1)
    assert torch.equal(maps, again)
    assert torch.equal(maps, oracle(boxes, labels, 4, 23, 31, factors=factors))
    assert torch.all(maps <= render_label_maps(boxes, labels, 4, 23, 31))


def test_jitter_scales_about_half_the_boxes_by_a_uniform_factor():
    num_boxes = 800  # one 6 x 6 box per image, so each image's map is one box's values
    boxes = [torch.tensor([[1.0, 1.0, 7.0, 7.0]])] * num_boxes
    labels = [torch.tensor([0])] * num_boxes
    plain = render_label_maps(boxes, labels, 1, 9, 9)
    jittered = render_label_maps(boxes, labels, 1, 9, 9, box_jitter=True, generator=torch.Generator().manual_seed(1))
    factor = jittered.amax(dim=(1, 2, 3)) / plain.amax(dim=(1, 2, 3))
    assert torch.allclose(jittered, plain * factor[:, None, None, None])
    scaled = factor[factor < 1]
    assert 0.44 < len(scaled) / num_boxes < 0.56  # ~4.4 standard deviations
    assert 0.4 < scaled.mean() < 0.6 and scaled.min() < 0.1 and scaled.max() > 0.9
    assert not torch.equal(jittered, render_label_maps(boxes, labels, 1, 9, 9, box_jitter=True))


coordinate = st.one_of(st.integers(-12, 28).map(float), st.floats(-12, 28, allow_nan=False, width=32))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.tuples(coordinate, coordinate, coordinate, coordinate, st.integers(0, 2)), max_size=6),
             min_size=1, max_size=3),
    st.integers(1, 16),
    st.integers(1, 16),
)
def test_property_random_boxes_equal_oracle(images, height, width):
    boxes = [torch.tensor([b[:4] for b in image], dtype=torch.float32).reshape(-1, 4) for image in images]
    labels = [torch.tensor([b[4] for b in image], dtype=torch.long) for image in images]
    maps = render_label_maps(boxes, labels, 3, height, width)
    assert_valid_values(maps)
    assert torch.equal(maps, oracle(boxes, labels, 3, height, width))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    boxes, labels = random_batch(11, max_boxes=30)
    masks = [torch.rand(len(b), 23, 31, generator=torch.Generator().manual_seed(2)) < 0.7 for b in boxes]
    cpu = render_label_maps(boxes, labels, 4, 23, 31, masks=masks, classes=torch.tensor([3, 1]))
    cuda = render_label_maps([b.cuda() for b in boxes], [l.cuda() for l in labels], 4, 23, 31,
                             masks=[m.cuda() for m in masks], classes=torch.tensor([3, 1], device="cuda"))
    assert cuda.device.type == "cuda"
    assert torch.equal(cuda.cpu(), cpu)
