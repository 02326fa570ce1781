"""IVF index: partitions, routers, scanners and the faiss backend."""

from .ivf import IVFIndex, SearchInfo, partitions_digest
from .kmeans import kmeans
from .routers import CentroidRouter, FixedRouter, KeyNetRouter, Route, Router, SupportRouter
from .scanners import ExactScanner

__all__ = [
    "IVFIndex",
    "SearchInfo",
    "partitions_digest",
    "kmeans",
    "Router",
    "Route",
    "CentroidRouter",
    "SupportRouter",
    "KeyNetRouter",
    "FixedRouter",
    "ExactScanner",
]
