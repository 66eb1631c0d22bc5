"""Moved to `longva_cli.parallel` (shared by training and niah); this name remains only for
`longva_cli.niah.sharded`, until it imports from `longva_cli.parallel` directly."""

from longva_cli.parallel import enable, init_distributed, shard_indices  # noqa: F401
