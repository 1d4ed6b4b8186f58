"""Sparse attention methods on the block-sparse engine (:mod:`attnzoo.core.blocksparse`).

Each module says *which* keys a query reads (a layout); the engine attends.
"""
