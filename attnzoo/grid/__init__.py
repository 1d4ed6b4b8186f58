"""Grid re-layout for vision and video attention: 2-D / 3-D token orders, windows, shifts, dilated
neighbourhoods, point-cloud sorting, and the grid patterns as ``mask_mod``s / sorted block patterns
that the block-sparse engine runs (``attnzoo.catalog.vision`` registers them as methods)."""

from .layout import (axis_neighbors, check_grid, cyclic_shift, flat_window_order, flatten, from_channels_first,
                     neighborhood_index, per_axis, shifted_window_merge,
                     shifted_window_partition, to_channels_first, unflatten, window_ids, window_merge,
                     window_partition)
from .masks import (SortedPattern, neighborhood_mask_mod, neighborhood_pattern, tile3d_mask_mod, tile3d_pattern,
                    window_mask_mod, window_pattern)

__all__ = ["SortedPattern", "axis_neighbors", "check_grid", "cyclic_shift", "flat_window_order", "flatten",
           "from_channels_first", "neighborhood_index", "neighborhood_mask_mod", "neighborhood_pattern", "per_axis", "shifted_window_merge", "shifted_window_partition",
           "tile3d_mask_mod", "tile3d_pattern", "to_channels_first", "unflatten", "window_ids", "window_mask_mod",
           "window_merge", "window_partition", "window_pattern"]
