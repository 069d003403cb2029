"""Running brigade outside a developer's terminal: local swarms of processes (``launcher``), the
multi-host testbed and its link emulation.

Containers, compose files and service units live beside this package as plain files.
"""
