"""Readers and writers for the on-disk formats of real data sets (see docs/formats.md).

Readers turn one upstream layout into our records (:mod:`samtok.data.records`), streaming where
the layout allows, and raise :class:`~samtok.data.records.RecordError` naming the file, the
record and the field when something is wrong. Writers write the exact upstream layout (plus a
few optional keys upstream tools ignore, listed in docs/formats.md). A data config names a
format through :func:`open_source`.
"""

from .coco import CocoIndex, read_coco_instances, write_coco_instances
from .conversation import read_conversations, write_conversations
from .gcg import read_grandf, read_grandf_eval, write_grandf
from .grefcoco import read_grefcoco_samples, write_grefcoco_refs
from .multiround import read_segllm, write_segllm
from .refer import read_refer_samples, write_refer_refs
from .region_caption import read_region_captions, write_region_captions
from .registry import KINDS, DataSource, open_source
from .safe_pickle import UnsafePickleError, load_plain_pickle
from .sa1b import read_sa1b, write_sa1b
from .scene_graph import read_psg, write_panoptic_png, write_psg
from .synthetic_layout import read_synthetic_split, synthetic_split_paths, write_synthetic_split

__all__ = [
    "KINDS",
    "CocoIndex",
    "DataSource",
    "UnsafePickleError",
    "load_plain_pickle",
    "open_source",
    "read_coco_instances",
    "read_conversations",
    "read_grandf",
    "read_grandf_eval",
    "read_grefcoco_samples",
    "read_psg",
    "read_refer_samples",
    "read_region_captions",
    "read_sa1b",
    "read_segllm",
    "read_synthetic_split",
    "synthetic_split_paths",
    "write_coco_instances",
    "write_conversations",
    "write_grandf",
    "write_grefcoco_refs",
    "write_panoptic_png",
    "write_psg",
    "write_refer_refs",
    "write_region_captions",
    "write_sa1b",
    "write_segllm",
    "write_synthetic_split",
]
