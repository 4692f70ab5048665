"""Records, prompt templates, loaders (files, hub, package benchmarks) and client partitioning."""

from ray_fedit.data.loaders import LoadResult, load_source
from ray_fedit.data.schema import Record, make_record

__all__ = ["LoadResult", "Record", "load_source", "make_record"]
