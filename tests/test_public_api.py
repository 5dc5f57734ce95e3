import logging

import bigmodel

EXPECTED = [
    "BigModelError",
    "Checkpoint",
    "CheckpointConflictError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointPermissionError",
    "CheckpointWriteError",
    "DistributedError",
    "DistributedOptions",
    "Estimate",
    "IOOptions",
    "InvalidCheckpointError",
    "KeyMappingError",
    "KeyMismatchError",
    "LoadReport",
    "LoadStateDictError",
    "MetaTensorError",
    "MismatchedKey",
    "MissingInitializerError",
    "OffloadOptions",
    "PlanError",
    "PretrainedMixin",
    "Problem",
    "RemoteError",
    "RemoteOptions",
    "SaveHandle",
    "SaveResult",
    "ShardedLoadReport",
    "TensorInfo",
    "TensorSlice",
    "UnsafeCheckpointError",
    "UnsupportedTensorError",
    "VerifyResult",
    "__version__",
    "compute_module_sizes",
    "dcp_to_hf",
    "dispatch_model",
    "estimate_memory",
    "from_pretrained",
    "hf_to_dcp",
    "infer_device_map",
    "init_empty_weights",
    "init_on_device",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "open_checkpoint",
    "parse_size",
    "release_staging_memory",
    "save_checkpoint",
]


def test_public_names_are_exactly_the_pinned_list():
    assert sorted(bigmodel.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert hasattr(bigmodel, name), name


def test_every_error_derives_from_bigmodel_error():
    for name in EXPECTED:
        obj = getattr(bigmodel, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, bigmodel.BigModelError), name


def test_the_package_logger_has_no_handlers():
    logger = logging.getLogger("bigmodel")
    assert logger.handlers == []
