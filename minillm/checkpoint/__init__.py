"""HDF5 checkpoints: save / load a plain nested dict, find / prune them in a run dir, inspect them.

The functions know nothing of models: the trainer builds a dict like
``{"meta": {...}, "config": {...}, "model": {name: array}, "optimizer": {...}, "scaler": {...},
"rng": {...}}`` and gets the same dict back (NumPy arrays) from ``load_checkpoint``.
"""
from minillm.checkpoint.files import (checkpoint_path, checkpoint_step, find_latest_checkpoint,
                                      list_checkpoints, make_room, prune_checkpoints,
                                      stale_temp_files)
from minillm.checkpoint.hdf5 import (CHECKPOINT_VERSION, checkpoint_header, iter_tensors,
                                     load_checkpoint, open_checkpoint, read_tensor,
                                     save_checkpoint, verify_checkpoint)
from minillm.checkpoint.report import check_config, check_vocab, compare_config, inspect_checkpoint

__all__ = [
    "CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
    "read_tensor", "iter_tensors", "checkpoint_header", "open_checkpoint",
    "checkpoint_path", "checkpoint_step", "list_checkpoints", "find_latest_checkpoint",
    "prune_checkpoints", "make_room", "stale_temp_files",
    "inspect_checkpoint", "compare_config", "check_config", "check_vocab",
]
