"""The public API is pinned: what ``multimodule``, ``multimodule.transit`` and
``multimodule.transit.lowlevel`` export, and that every error class is in ``multimodule.errors``
(as httpx's tests/test_exported_members.py pins httpx's)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import multimodule
import multimodule.errors
import multimodule.transit
import multimodule.transit.lowlevel

ERRORS = {
    "MultiModuleError",
    "UsageError",
    "ConfigError",
    "TaskError",
    "TaskNotFound",
    "TaskImportFailed",
    "TaskStartFailed",
    "HandlerTimeout",
    "TransitError",
    "InvalidQueueName",
    "UnserializableMessage",
    "QueueFull",
    "Empty",
    "BadMessage",
    "QueueRemoved",
    "TransitBroken",
    "QueueCreationRefused",
    "Cancelled",
    "InvalidDestination",
    "BridgeError",
    "MessageTooLarge",
    "StateError",
    "AlreadyRunning",
    "BackendError",
    "UnitError",
    "DetachedProcessError",
    "CommandError",
}

TRANSIT_ERRORS = {
    "TransitError",
    "InvalidQueueName",
    "UnserializableMessage",
    "QueueFull",
    "Empty",
    "BadMessage",
    "QueueRemoved",
    "QueueCreationRefused",
    "TransitBroken",
    "InvalidDestination",
}

EXPECTED = {
    multimodule: {"Task", "__version__", *ERRORS},
    multimodule.errors: ERRORS,
    multimodule.transit: {
        "send",
        "receive",
        "stat",
        "configure",
        "Transit",
        "QueueStat",
        "validate_qname",
        "default_transit_dir",
        "MAX_NAME_CHARS",
        "META_KEY",
        *TRANSIT_ERRORS,
    },
    multimodule.transit.lowlevel: {
        "default",
        "declare_local",
        "LocalQueue",
        "SysvQueue",
        "Overflow",
        "AsyncReceiver",
        "ensure_handler",
        "encode_body",
        "make_meta",
        "copy_message",
        "decode_body",
        "split_header",
        "HEADER_JSON",
        "ENV_TRANSIT_DIR",
        "SYSTEM_TRANSIT_DIR",
        "BRIDGE_QNAME",
        "DESTINATION_KEY",
        "DESTINATION_QNAME_KEY",
        "hostname",
        "is_remote",
        "addressed",
        "validate_destination",
    },
}


@pytest.mark.parametrize("module", list(EXPECTED), ids=lambda m: m.__name__)
def test_all_names_exist_and_are_the_expected_ones(module):
    # Every name in __all__ exists, none twice, and __all__ is exactly the pinned set
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
    assert len(module.__all__) == len(set(module.__all__))
    assert set(module.__all__) == EXPECTED[module]


def test_the_root_exports_the_error_classes_themselves():
    for name in ERRORS:
        assert getattr(multimodule, name) is getattr(multimodule.errors, name)
    for name in TRANSIT_ERRORS:
        assert getattr(multimodule.transit, name) is getattr(multimodule.errors, name)


def _all_modules():
    yield multimodule
    for info in pkgutil.walk_packages(multimodule.__path__, prefix="multimodule."):
        yield importlib.import_module(info.name)


def test_every_exception_class_is_defined_in_errors_and_derives_from_the_root():
    # Given every module of the package (imported by walking it)
    misplaced, outside_tree = [], []
    for module in _all_modules():
        for name, obj in vars(module).items():
            if not (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            if obj.__module__ != module.__name__:
                continue  # imported, not defined here
            # Then each exception class defined in it is defined in multimodule.errors
            if module is not multimodule.errors:
                misplaced.append(f"{module.__name__}.{name}")
            # And belongs to the tree
            if not issubclass(obj, multimodule.MultiModuleError):
                outside_tree.append(f"{module.__name__}.{name}")
    assert misplaced == []
    assert outside_tree == []


def test_errors_exports_every_class_it_defines():
    defined = {name for name, obj in vars(multimodule.errors).items()
               if inspect.isclass(obj) and obj.__module__ == "multimodule.errors"}
    assert defined == set(multimodule.errors.__all__)
