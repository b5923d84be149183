"""Open a RecordIO set the way training does (of_face.train.trainer._open_record_dataset) and
record whether this rank built the label index or read the cache.

argv: OUT_JSON DATA_ROOT. Rank r writes OUT_JSON.<r>: {"builds": n, "labels": [...]}.
"""
import json
import sys

from of_face import parallel
from of_face.config import DataCfg
from of_face.data import record_index
from of_face.train.trainer import _open_record_dataset

out, root = sys.argv[1], sys.argv[2]
builds = []
real_build = record_index.build


def counting_build(*args):
    builds.append(args)
    return real_build(*args)


record_index.build = counting_build
dataset = _open_record_dataset(DataCfg(dataset="rec", root=root))
with open(f"{out}.{parallel.rank()}", "w") as f:
    json.dump({"builds": len(builds), "labels": dataset.labels().tolist()}, f)
