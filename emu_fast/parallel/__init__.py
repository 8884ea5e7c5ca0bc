"""Tensor parallelism over torch.distributed (emu_fast.parallel.tensor_parallel)."""
from .tensor_parallel import (TensorParallel, check_model_shardable, check_same_inputs, check_shardable, resolve_group,
                              shard_layer, shard_layers)

__all__ = ["TensorParallel", "check_model_shardable", "check_same_inputs", "check_shardable", "resolve_group",
           "shard_layer", "shard_layers"]
