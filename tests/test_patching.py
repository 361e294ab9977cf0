"""Tests of training.patching (docs/DESIGN.md section 2): sizes, probabilities,
multipliers, the per-step draw, cropping and coordinate grids."""

import numpy as np
import pytest
import torch

from training import patching


# ----------------------------------------------------------------------------
# Sizes, probabilities, multipliers.

@pytest.mark.parametrize('real_p', [0.0, 0.25, 0.5, 1.0])
def test_sizes_and_probs(real_p):
    assert patching.patch_sizes(64) == [16, 32, 64]
    assert patching.patch_sizes(32, latent=True) == [16, 32]
    pixel = patching.patch_probs(real_p)
    latent = patching.patch_probs(real_p, latent=True)
    assert pixel == pytest.approx([(1 - real_p) * 0.4, (1 - real_p) * 0.6, real_p])
    assert latent == pytest.approx([1 - real_p, real_p])
    assert sum(pixel) == pytest.approx(1.0) and sum(latent) == pytest.approx(1.0)


def test_multiplier_is_r_over_p_and_matches_official_table():
    assert patching.batch_multiplier(64, 64) == 1
    assert patching.batch_multiplier(64, 32) == 2   # official table at R = 64
    assert patching.batch_multiplier(64, 16) == 4
    for resolution in (32, 128, 256):
        for size in patching.patch_sizes(resolution):
            assert patching.batch_multiplier(resolution, size) == resolution // size
    assert patching.batch_multiplier(256, 64) == 4 and patching.batch_multiplier(32, 8) == 4


# The official code's multipliers, as its training loop takes them: table[P] // table[R].
OFFICIAL_TABLE = {512: 1, 256: 2, 128: 4, 64: 16, 32: 32, 16: 64}


@pytest.mark.parametrize('resolution, latent, expected', [(128, False, [8, 4, 1]), (256, False, [8, 2, 1]),
                                                          (64, False, [4, 2, 1]), (512, False, [4, 2, 1]),
                                                          (32, True, [2, 1]), (64, True, [2, 1])])
def test_official_multipliers_are_the_official_table(resolution, latent, expected):
    """--batch-mult=official: at 128 px x8 and x4 for 32 and 64 px patches,
    at 256 px x8 and x2 for 64 and 128 px; the formula R/P elsewhere too."""
    schedule = patching.PatchSchedule(resolution, 0.5, latent=latent, batch_mult='official')
    assert schedule.multipliers == [OFFICIAL_TABLE[P] // OFFICIAL_TABLE[resolution] for P in schedule.sizes]
    assert schedule.multipliers == expected
    assert [schedule.multiplier(P) for P in schedule.sizes] == expected
    assert schedule.expected_multiplier == pytest.approx(np.dot(schedule.probs, expected))
    formula = patching.PatchSchedule(resolution, 0.5, latent=latent)
    assert formula.batch_mult == 'formula' and formula.multipliers == [resolution // P for P in formula.sizes]
    # A round merges only as many rounds as fit in a full round's pixels.
    for P, m in zip(schedule.sizes, schedule.multipliers):
        assert schedule.merge_limit(P) == max(1, min(m, resolution ** 2 // (m * P * P)))
        assert formula.merge_limit(P) == formula.multiplier(P)
    assert patching.PatchSchedule(128, 0.5, batch_mult='official').merge_limit(32) == 2


@pytest.mark.parametrize('resolution, latent, real_p, multiple', [(32, False, 0.5, 1), (16, True, 0.5, 1),
                                                                  ((32, 48), False, 0.5, 1), (48, False, 0.5, 8),
                                                                  (1024, False, 0.5, 1), (96, False, 0.5, 8)])
def test_official_multipliers_refuse_sizes_the_table_lacks(resolution, latent, real_p, multiple):
    with pytest.raises(ValueError, match=r'^--batch-mult=official: the official code\'s table has multipliers for '
                                         r'square images and patches of sides 16, 32, 64, 128, 256, 512 only, '
                                         r'not .* px patches of .* px images; use --batch-mult=formula \(R/P\)$'):
        patching.PatchSchedule(resolution, real_p, latent=latent, multiple=multiple, batch_mult='official')
    assert patching.PatchSchedule(32, 1.0, batch_mult='official').multipliers == [1]   # full images: in the table
    with pytest.raises(ValueError, match='batch_mult'):
        patching.PatchSchedule(64, 0.5, batch_mult='table')


@pytest.mark.parametrize('resolution,latent,real_p,expected', [
    (64, False, 0.5, 1.9),      # 0.2 * 4 + 0.3 * 2 + 0.5 * 1
    (64, False, 1.0, 1.0),
    (64, False, 0.0, 2.8),      # 0.4 * 4 + 0.6 * 2
    (32, True, 0.5, 1.5),       # 0.5 * 2 + 0.5 * 1
    (32, True, 0.0, 2.0),
])
def test_schedule_multipliers(resolution, latent, real_p, expected):
    schedule = patching.PatchSchedule(resolution, real_p, latent=latent)
    assert schedule.expected_multiplier == pytest.approx(expected)
    assert schedule.multipliers == [resolution // s for s in schedule.sizes]
    assert all(q > 0 for q in schedule.probs) and sum(schedule.probs) == pytest.approx(1.0)
    assert [schedule.multiplier(s) for s in schedule.sizes] == schedule.multipliers
    assert str(schedule.sizes[0]) in schedule.describe()


def test_zero_probability_sizes_are_dropped():
    assert patching.PatchSchedule(64, 1.0).sizes == [64]
    assert patching.PatchSchedule(64, 0.0).sizes == [16, 32]
    assert patching.PatchSchedule(32, 0.0, latent=True).sizes == [16]


@pytest.mark.parametrize('real_p', [-0.1, 1.5])
def test_real_p_out_of_range_raises(real_p):
    with pytest.raises(ValueError, match='real_p'):
        patching.PatchSchedule(64, real_p)


@pytest.mark.parametrize('resolution,latent', [(16, False), (28, False), (8, True), (30, False)])
def test_resolution_too_small_raises(resolution, latent):
    with pytest.raises(ValueError, match=rf'{resolution}x{resolution} pixels are too small.*at least'):
        patching.PatchSchedule(resolution, 0.5, latent=latent)


def test_full_images_only_work_at_any_resolution():
    """--real_p=1 is what the error message suggests for small resolutions."""
    for resolution in (4, 8, 16):
        schedule = patching.PatchSchedule(resolution, 1.0)
        assert schedule.sizes == [resolution] and schedule.draw(3) == resolution


# ----------------------------------------------------------------------------
# The per-step draw.

@pytest.mark.parametrize('latent,real_p', [(False, 0.5), (False, 0.2), (True, 0.3)])
def test_draw_frequencies_match_probabilities(latent, real_p):
    schedule = patching.PatchSchedule(64, real_p, latent=latent, seed=11)
    steps = 20000
    draws = np.array([schedule.draw(k) for k in range(steps)])
    for size, prob in zip(schedule.sizes, schedule.probs):
        assert np.mean(draws == size) == pytest.approx(prob, abs=0.015)
    assert set(draws.tolist()) == set(schedule.sizes)


def test_draw_is_deterministic_in_seed_and_step():
    a = patching.PatchSchedule(64, 0.5, seed=7)
    b = patching.PatchSchedule(64, 0.5, seed=7)
    np.random.seed(1)
    torch.manual_seed(1)
    first = [a.draw(k) for k in range(200)]
    np.random.seed(2)          # per-rank global RNG state must not matter
    torch.manual_seed(2)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    second = [b.draw(k) for k in reversed(range(200))][::-1]   # order of calls must not matter
    assert first == second
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)
    other = patching.PatchSchedule(64, 0.5, seed=8)
    assert [other.draw(k) for k in range(200)] != first


def test_progressive_schedule_switches_at_cumulative_shares():
    schedule = patching.PatchSchedule(64, 0.5, progressive=True)   # shares 0.2, 0.3, 0.5
    assert schedule.draw(0, progress=0.0) == 16
    assert schedule.draw(5, progress=0.19) == 16
    assert schedule.draw(5, progress=0.21) == 32
    assert schedule.draw(5, progress=0.49) == 32
    assert schedule.draw(5, progress=0.51) == 64
    assert schedule.draw(5, progress=1.0) == 64
    sizes = [schedule.draw(0, progress=t) for t in np.linspace(0, 1, 101)]
    assert sizes == sorted(sizes)
    assert [sizes.count(s) / 101 for s in (16, 32, 64)] == pytest.approx([0.2, 0.3, 0.5], abs=0.02)
    assert all(schedule.draw(k, progress=0.3) == 32 for k in range(20))   # not random

    latent = patching.PatchSchedule(32, 0.25, latent=True, progressive=True)
    assert [latent.draw(0, progress=t) for t in (0.0, 0.7, 0.8, 1.0)] == [16, 16, 32, 32]


def official_progressive_size(patch_list, p_list, cur_nimg, total_kimg):
    """The official loop's progressive patch size: the first size whose
    cumulative share (the last one set to 10) is >= cur_nimg // 1000 / total_kimg."""
    p_cumsum = np.array(p_list).cumsum()
    p_cumsum[-1] = 10.
    return int(np.array(patch_list)[(cur_nimg // 1000 / total_kimg) <= p_cumsum][0])


@pytest.mark.parametrize('batch', [4, 24, 64, 256])
@pytest.mark.parametrize('total_kimg, real_p', [(3, 0.5), (7, 0.5), (10, 0.2), (25, 0.75), (200, 0.5)])
def test_progressive_switches_where_the_official_code_does(batch, total_kimg, real_p):
    """Every step of a run (images counted as the Trainer counts them, batch * m)
    trains on the official code's size: phases start at whole kimg."""
    schedule = patching.PatchSchedule(64, real_p, progressive=True)
    patch_list, p_list = [16, 32, 64], [(1 - real_p) * 2 / 5, (1 - real_p) * 3 / 5, real_p]
    total_nimg = max(int(total_kimg * 1000), 1)   # the Trainer's
    nimg, step, sizes, switches = 0, 0, [], []
    while nimg < total_nimg:
        P = schedule.draw(step, patching.training_progress(nimg, total_nimg))
        assert P == official_progressive_size(patch_list, p_list, nimg, total_kimg), (step, nimg)
        if sizes and P != sizes[-1]:
            switches.append(nimg)
        sizes.append(P)
        nimg, step = nimg + batch * schedule.multiplier(P), step + 1
    # A phase ends only once the whole kimg exceed its cumulative share: never at a part of a kimg.
    cum = np.cumsum(p_list)[:2]
    assert len(switches) == 2 and all(s >= np.ceil(c * total_kimg + 1e-9) * 1000 for s, c in zip(switches, cum))


def test_training_progress_is_whole_kimg_over_the_duration():
    assert patching.training_progress(0, 3000) == 0
    assert patching.training_progress(999, 3000) == 0
    assert patching.training_progress(1999, 3000) == 1 / 3
    assert patching.training_progress(200_000_512, 200_000_000) == 200_000 // 1 / 200_000
    assert patching.training_progress(150_999, 200_000) == 150 / 200   # the exact fraction would be 0.754995


# ----------------------------------------------------------------------------
# Cropping and coordinates.

def _naive_crop(images, top, left, size):
    return torch.stack([images[n, :, t:t + size, l:l + size] for n, (t, l) in enumerate(zip(top.tolist(), left.tolist()))])


def _naive_grid(top, left, size, resolution):
    def value(index):
        return (index / (resolution - 1) - 0.5) * 2
    grid = torch.empty(len(top), 2, size, size)
    for n in range(len(top)):
        for i in range(size):
            for j in range(size):
                grid[n, 0, i, j] = value(int(left[n]) + j)   # x = column
                grid[n, 1, i, j] = value(int(top[n]) + i)    # y = row
    return grid


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('size', [1, 4, 7, 16])
def test_crop_matches_naive_loop(channels, size):
    resolution, n = 16, 9
    gen = torch.Generator().manual_seed(size * 10 + channels)
    images = torch.randn(n, channels, resolution, resolution, generator=gen)
    top, left = patching.random_corners(n, resolution, size, generator=gen)
    assert top.dtype == torch.long and top.shape == (n,) and left.shape == (n,)
    assert int(top.min()) >= 0 and int(top.max()) <= resolution - size
    patches = patching.crop(images, top, left, size)
    assert patches.shape == (n, channels, size, size)
    assert torch.equal(patches, _naive_crop(images, top, left, size))

    uint8 = (torch.arange(n * channels * resolution ** 2) % 251).to(torch.uint8).reshape(images.shape)
    assert torch.equal(patching.crop(uint8, top, left, size), _naive_crop(uint8, top, left, size))


def test_random_corners_are_uniform_and_per_image():
    resolution, size, n = 16, 4, 4000
    top, left = patching.random_corners(n, resolution, size, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(top, minlength=resolution - size + 1)
    assert len(counts) == resolution - size + 1 and int(counts.min()) > 0   # both ends reachable
    assert counts.float().std() / counts.float().mean() < 0.15
    assert not torch.equal(top, left) and len(set(zip(top.tolist(), left.tolist()))) > 100


@pytest.mark.parametrize('resolution,size', [(8, 8), (16, 4), (16, 5), (32, 16)])
def test_patch_grid_matches_naive_loop(resolution, size):
    gen = torch.Generator().manual_seed(resolution + size)
    top, left = patching.random_corners(5, resolution, size, generator=gen)
    grid = patching.patch_grid(top, left, size, resolution)
    assert grid.shape == (5, 2, size, size) and grid.dtype == torch.float32
    torch.testing.assert_close(grid, _naive_grid(top, left, size, resolution), rtol=0, atol=1e-6)
    assert patching.patch_grid(top, left, size, resolution, dtype=torch.float64).dtype == torch.float64


def test_full_grid_corners():
    grid = patching.full_grid(8, batch_size=3)
    assert grid.shape == (3, 2, 8, 8)
    assert grid[:, :, 0, 0].tolist() == [[-1.0, -1.0]] * 3               # top-left: x = y = -1
    assert grid[:, :, -1, -1].tolist() == [[1.0, 1.0]] * 3                # bottom-right
    assert grid[0, 0, 0, -1] == 1 and grid[0, 1, 0, -1] == -1             # top-right: x = 1, y = -1
    assert grid[0, 0, -1, 0] == -1 and grid[0, 1, -1, 0] == 1             # bottom-left
    assert torch.equal(grid[0, 0], grid[0, 1].T)
    assert patching.coordinate_values(np.array([0, 3.5, 7]), 8).tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize('size', [4, 8, 16])
def test_random_patches_consistent_with_full_grid(size):
    """Crop images that hold their own coordinates (channels 0-1) and a pixel id
    (channel 2): the patch must equal its grid, and the id gives the corner."""
    resolution, n = 16, 6
    full = patching.full_grid(resolution, n)
    ids = torch.arange(resolution * resolution, dtype=torch.float32).reshape(1, 1, resolution, resolution)
    images = torch.cat([full, ids.expand(n, -1, -1, -1)], dim=1)
    patches, pos = patching.random_patches(images, size, generator=torch.Generator().manual_seed(size))
    assert patches.shape == (n, 3, size, size) and pos.shape == (n, 2, size, size)
    assert torch.equal(pos, patches[:, :2])
    top, left = patches[:, 2, 0, 0].long() // resolution, patches[:, 2, 0, 0].long() % resolution
    assert torch.equal(pos, patching.patch_grid(top, left, size, resolution))
    assert torch.equal(patches, _naive_crop(images, top, left, size))
    if size < resolution:
        assert len(set(zip(top.tolist(), left.tolist()))) > 1   # each image has its own corner

    again, _ = patching.random_patches(images, size, generator=torch.Generator().manual_seed(size))
    assert torch.equal(again, patches)


def test_random_patches_full_size_and_dtypes():
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    patches, pos = patching.random_patches(images, 8)
    assert patches is images and pos.dtype == torch.float64
    assert torch.equal(pos, patching.full_grid(8, 2, dtype=torch.float64))
    uint8 = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    patches, pos = patching.random_patches(uint8, 4, generator=torch.Generator().manual_seed(0))
    assert patches.dtype == torch.uint8 and pos.dtype == torch.float32


@pytest.mark.parametrize('resolution,size,step', [(32, 16, 4), (32, 8, 4), ((16, 40), (8, 24), 8), (30, 12, 6)])
def test_grid_aligned_corners_are_uniform_multiples_of_the_step(resolution, size, step):
    (height, width), (h, w) = patching.image_shape(resolution), patching.image_shape(size)
    top, left = patching.random_corners(6000, resolution, size, generator=torch.Generator().manual_seed(0), step=step)
    for corner, room in [(top, height - h), (left, width - w)]:
        assert bool((corner % step == 0).all()) and int(corner.min()) >= 0 and int(corner.max()) <= room
        counts = torch.bincount(corner // step)
        assert len(counts) == room // step + 1 and int(counts.min()) > 0        # every grid corner, both ends
        assert counts.float().std() / counts.float().mean() < 0.15


@pytest.mark.parametrize('resolution,size', [(16, 4), ((16, 40), (8, 8))])
def test_step_one_draws_the_corners_as_before(resolution, size):
    """Step 1 (the default, crop_align='pixel') gives the draws of torch.randint over every corner."""
    (height, width), (h, w) = patching.image_shape(resolution), patching.image_shape(size)
    top, left = patching.random_corners(50, resolution, size, generator=torch.Generator().manual_seed(3), step=1)
    gen = torch.Generator().manual_seed(3)
    if height - h == width - w:
        expected = torch.randint(0, height - h + 1, (2, 50), generator=gen)
    else:
        expected = torch.stack([torch.randint(0, height - h + 1, (50,), generator=gen),
                                torch.randint(0, width - w + 1, (50,), generator=gen)])
    assert torch.equal(top, expected[0]) and torch.equal(left, expected[1])


def test_crop_align_grid_puts_every_training_crop_on_the_token_grid():
    """A DiT of 4-pixel tokens trained with crop_align='grid' sees crops whose coordinates are those of
    the full image's token grid; 'pixel' (the default) also gives corners between them."""
    schedule = patching.PatchSchedule(32, real_p=0.5, multiple=4, crop_align='grid')
    assert schedule.corner_step == 4 and patching.PatchSchedule(32, 0.5, multiple=4).corner_step == 1
    full = patching.full_grid(32, 1)
    images = torch.randn(200, 3, 32, 32)
    for align, on_grid in [('grid', True), ('pixel', False)]:
        step = patching.PatchSchedule(32, real_p=0.5, multiple=4, crop_align=align).corner_step
        _, pos = patching.random_patches(images, 16, torch.Generator().manual_seed(0), corner_step=step)
        starts = ((pos[:, 0, 0, 0] - full[0, 0, 0, 0]) / (full[0, 0, 0, 1] - full[0, 0, 0, 0])).round().long()
        assert bool((starts % 4 == 0).all()) == on_grid
    with pytest.raises(ValueError, match="crop_align='tokens': choose one of pixel, grid"):
        patching.PatchSchedule(32, real_p=0.5, crop_align='tokens')
