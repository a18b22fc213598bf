"""Token data: tensorstore shards and manifests (store.py), Grain pipelines that pack rows
(pipeline.py), the modality mixture (mixture.py) and the per-process shard assembly (shards.py).
Imports only errors, storage, vocab from the rest of tmdm."""
