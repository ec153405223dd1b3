"""Ingest on Ray Data (``engine ingest PATH... --ray``): the driver plans as plain ingest does,
actors decode and embed partitions of the files into ``engine-shards/1`` shards, and one commit
step imports the shards with ingest's own rules. Ray is imported only when a run starts."""

from ingest.distributed.cluster import RayConfig
from ingest.distributed.driver import RayIngestReport, ingest_with_ray

__all__ = ["RayConfig", "RayIngestReport", "ingest_with_ray"]
