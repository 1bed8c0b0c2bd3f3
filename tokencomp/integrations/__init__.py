"""Integrations with third-party tools. Each submodule imports its tool; this package imports nothing.

* :mod:`tokencomp.integrations.lmms_eval` — ``lmms-eval --model tokencomp`` (``pip install 'tokencomp[eval]'``).
"""
