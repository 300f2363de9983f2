"""The grid of patch positions: centres, foreground selection, chunks with halo, projection to voxels."""

from __future__ import annotations

import numpy as np
import pytest

from jule3d.grid import Grid


@pytest.mark.parametrize("shape, w, stride", [((20, 17, 23), 5, 2), ((9, 9, 9), 1, 1), ((30, 11, 14), 7, 3)])
def test_centres_and_selection(shape, w, stride) -> None:
    grid = Grid(shape, w, stride)
    centres = grid.centers()
    assert len(centres) == int(np.prod(grid.grid_shape))
    assert centres.min() == (w - 1) // 2 and np.all(centres + w // 2 < np.array(shape))  # whole patches inside
    assert np.all(centres.max(axis=0) + w // 2 + stride >= np.array(shape))  # no room for one more position
    mask = np.random.default_rng(0).random(shape) > 0.5
    np.testing.assert_array_equal(grid.select(mask).ravel(), mask[tuple(centres.T)])


def test_chunks_tile_the_grid_once_and_their_halo_holds_every_patch() -> None:
    grid = Grid((25, 19, 30), 5, 2)
    count = np.zeros(grid.grid_shape, int)
    positions = np.argwhere(np.ones(grid.grid_shape, bool))
    corners = grid.centers(positions) - grid.offset
    for start, stop in grid.chunks(4):
        count[tuple(slice(a, b) for a, b in zip(start, stop))] += 1
        halo = grid.halo(start, [b - 1 for b in stop])
        mine = np.all((positions >= start) & (positions < stop), axis=1)
        for i in range(3):  # every patch of the chunk lies inside its halo box
            assert halo[i].start <= corners[mine, i].min() and corners[mine, i].max() + 5 <= halo[i].stop
    np.testing.assert_array_equal(count, 1)


def test_to_voxels_blocks_and_border() -> None:
    grid = Grid((12, 12, 12), 5, 2)
    values = np.arange(1, 1 + np.prod(grid.grid_shape)).reshape(grid.grid_shape)
    voxels = grid.to_voxels(values)
    assert voxels.shape == (12, 12, 12)
    for position in np.argwhere(np.ones(grid.grid_shape, bool)):
        c = grid.centers(position[None])[0]
        block = voxels[tuple(slice(x - 1, x + 1) for x in c)]  # [c - s//2, c - s//2 + s)
        assert np.all(block == values[tuple(position)])
    assert voxels[0, 0, 0] == values[0, 0, 0] and voxels[-1, -1, -1] == values[-1, -1, -1]
    holes = values.copy()
    holes[0, 0, 0] = 0
    assert grid.to_voxels(holes)[0, 0, 0] in (values[1, 0, 0], values[0, 1, 0], values[0, 0, 1])


def test_bad_grids() -> None:
    with pytest.raises(ValueError, match="smaller than the patch size"):
        Grid((4, 10, 10), 5, 1)
    with pytest.raises(ValueError, match="stride"):
        Grid((10, 10, 10), 5, 0)
    with pytest.raises(ValueError, match="grid shape"):
        Grid((10, 10, 10), 5, 1).to_voxels(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="chunk"):
        next(Grid((10, 10, 10), 5, 1).chunks(0))
