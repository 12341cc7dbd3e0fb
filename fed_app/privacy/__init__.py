"""Everything that protects what leaves a client, in one place (docs/privacy.md).

- ``policy``: the client's own limits (node config or the simulator's), checked on every
  request: k, range result sets, a query budget, the distance grid, the minimum count.
- ``release``: what a client may release from its shard: no centroid or Lloyd cell
  supported by fewer than ``min_count`` vectors, rounded sizes.
"""
