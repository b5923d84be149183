"""The run folder and its checkpoints: `folder.RunFolder` (lock, listing, lineage, resume,
saving and rotation, the file names), `checkpoint` (one checkpoint: `save`, `load`), `shards`
(the sharded format), `lock`, `changes` (what a resume may change), `names` (file names).

Imports nothing itself: `of_face.run.names` stays cheap (no OneFlow) for the metrics readers.
"""
