"""Shared test set-up.

Entry-point plugins installed in the developer's environment must not leak into the tests, so
entry-point autoload is off for the whole session (set before tokencomp first loads its plugins,
which happens lazily). A test that needs entry points or registers plugins does so in a registry of
its own (the ``plugin_registry`` / ``in_process_plugin`` fixtures), never in the process-wide default:
it unsets the variable with ``monkeypatch`` and calls ``plugin_registry.reload_entrypoints()``;
subprocesses get the environment they are given.

The fixtures shared with plugin authors (``plugin_registry``, ``in_process_plugin``, ``tiny_models``,
``make_view``, ``contract``) come from tokencomp's own pytest plugin, :mod:`tokencomp.pytest_plugin`.
"""

import os

os.environ["TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD"] = "1"

import torch  # noqa: E402

# Tiny models are dominated by per-op overhead: one thread is faster, and does not fight other
# processes for the cores (results are identical either way).
torch.set_num_threads(1)

pytest_plugins = ["tokencomp.pytest_plugin"]
