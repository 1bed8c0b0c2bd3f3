"""Shipped tokencomp recipes (YAML), installed as the ``tokencomp.recipes`` package data."""
