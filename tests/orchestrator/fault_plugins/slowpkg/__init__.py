"""Test-only package whose import can be made slow (see grnn_fault_plugin's `slow_import` mode): a lazy
import that a trial's timeout can interrupt halfway, as a cold worker's first `import torch._dynamo` can."""

import slowpkg.leaf
import slowpkg.slow  # noqa: F401  (busy for 40 s when grnn_fault_plugin.SLOW_IMPORT is set)

VALUE = slowpkg.leaf.VALUE
