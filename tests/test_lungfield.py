import numpy as np
import pytest

from covidxray.pixels.lungfield import AREA_RANGE, LungField, heat_share, heat_shares, \
    lung_field


def two_lungs(size=64, left=(8, 28), right=(36, 56), rows=(10, 54)) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    mask[rows[0]:rows[1], left[0]:left[1]] = 0.9
    mask[rows[0]:rows[1], right[0]:right[1]] = 0.9
    return mask


def test_lung_field_keeps_two_lungs_and_judges_them():
    probabilities = two_lungs()
    probabilities[2:4, 2:4] = 0.9  # a speck beside the lungs: not a third lung
    field = lung_field(probabilities)
    assert field.plausible and field.reason == ""
    assert not field.mask[2:4, 2:4].any() and field.mask[20, 15] and field.mask[20, 45]
    one_side = lung_field(two_lungs(right=(36, 36)))
    assert not one_side.plausible and "one lung field only" in one_side.reason
    # an off-centre film: both lungs left of the image's midline, still side by side
    assert lung_field(two_lungs(left=(2, 14), right=(17, 30))).plausible
    stacked = np.zeros((64, 64), np.float32)  # one above the other, as no frontal film has them
    stacked[4:30, 20:34], stacked[34:62, 22:36] = 0.9, 0.9
    assert "not side by side" in lung_field(stacked).reason
    uneven = two_lungs()
    uneven[30:54, 36:56] = 0  # the right lung's top half only, 20 rows lower
    uneven[10:30, 36:56] = 0
    uneven[30:54, 36:56] = 0.9
    assert "tops of the two lung regions" in lung_field(uneven).reason
    wide = np.zeros((64, 64), np.float32)
    wide[20:40, 2:30], wide[20:40, 34:62] = 0.9, 0.9  # wider than high: a CT slice's lungs
    assert "as high as wide" in lung_field(wide).reason
    unsure = two_lungs()
    unsure[unsure == 0] = 0.45  # the network cannot tell anywhere else
    assert "unsure" in lung_field(unsure).reason
    nothing = lung_field(np.zeros((64, 64), np.float32))
    assert not nothing.plausible and "area 0%" in nothing.reason
    everything = lung_field(np.ones((64, 64), np.float32))
    assert not everything.plausible and everything.area > AREA_RANGE[1]


def test_box_margin_mask_and_heat_share():
    field = LungField(two_lungs() >= 0.5, 0.0, True, "")
    rows, cols = field.box((640, 320), margin=0.0)  # the mask covers rows 10..54, cols 8..56
    assert (rows.start, rows.stop) == (100, 540) and (cols.start, cols.stop) == (40, 280)
    wider_rows, wider_cols = field.box((640, 320), margin=0.1)
    assert wider_rows.start < 100 and wider_rows.stop > 540 and wider_cols.start < 40
    assert field.mask_at((128, 128)).shape == (128, 128) and field.mask_at((128, 128))[40, 30]
    outline = field.outline((128, 128))
    assert outline.any() and not outline[40, 30]  # the edge, not the inside
    heat = np.zeros((32, 32))
    heat[10, 7] = 1.0  # inside the left lung
    assert heat_share(heat, field.mask) == 1.0
    heat[1, 1] = 1.0  # and as much outside
    assert heat_share(heat, field.mask) == pytest.approx(0.5)
    assert heat_share(np.zeros((8, 8)), field.mask) == 0.0


def test_heat_share_at_the_finer_resolution_and_per_image():
    """A segmenter's coarse mask is laid on an image-sized heat map, a coarse Grad-CAM grid
    spread over an input-sized mask; the batch form gives NaN where no lungs were found."""
    field = LungField(two_lungs() >= 0.5, 0.0, True, "")
    fine = np.zeros((640, 640))
    fine[200, 150] = 1.0  # inside the left lung
    fine[20, 20] = 3.0  # outside, three times as hot
    assert heat_share(fine, field.mask) == heat_share(fine, field.mask_at(fine.shape)) == 0.25
    coarse = np.zeros((8, 8))
    coarse[4, 2] = 1.0  # the left lung's middle, spread over the 64 x 64 mask
    assert 0.9 < heat_share(coarse, field.mask) <= 1.0
    assert heat_share(-coarse, field.mask) == 0.0  # negative heat counts as none
    shares = heat_shares([fine, coarse], [field.mask, None])
    assert shares[0] == 0.25 and np.isnan(shares[1])


def _flood_labels(mask: np.ndarray) -> np.ndarray:
    """Connected regions the slow, obvious way: a flood from each unlabelled pixel, in flat
    order (so a region's label is its smallest flat index + 1)."""
    labels = np.zeros(mask.shape, np.int64)
    height, width = mask.shape
    for index in range(mask.size):
        row, col = divmod(index, width)
        if not mask[row, col] or labels[row, col]:
            continue
        pending = [(row, col)]
        labels[row, col] = index + 1
        while pending:
            r, c = pending.pop()
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not labels[rr, cc]:
                    labels[rr, cc] = index + 1
                    pending.append((rr, cc))
    return labels


def test_components_match_a_flood_fill():
    from covidxray.pixels.lungfield import components
    rng = np.random.default_rng(0)
    masks = [rng.random(rng.integers(1, 30, 2)) < rng.uniform(0.2, 0.8) for _ in range(200)]
    spiral = np.zeros((15, 15), bool)  # one region that winds back on itself
    spiral[1, 1:14] = spiral[1:14, 13] = spiral[13, 3:14] = spiral[3:14, 3] = True
    spiral[3, 3:12] = spiral[3:12, 11] = spiral[11, 5:12] = True
    masks += [spiral, np.zeros((4, 5), bool), np.ones((3, 7), bool)]
    for mask in masks:
        np.testing.assert_array_equal(components(mask), _flood_labels(mask))
