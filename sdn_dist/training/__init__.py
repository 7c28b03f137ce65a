"""Distributed training: the driver (``driver``: run directory, Ray, Ray Train), the per-worker loop
(``loop``), its state and stage schedule (``state``), checkpoints, metrics, sample grids, the export."""
