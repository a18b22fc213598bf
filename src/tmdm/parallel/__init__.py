"""Parallelism: the mesh's shape (mesh.py), the logical-to-physical sharding rules and host fetches
(sharding.py), multi-process start-up (distributed.py). Imports only errors from tmdm."""
