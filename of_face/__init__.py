"""of_face: ArcFace/CosFace training with PartialFC on OneFlow (nn.Graph over global tensors)."""
import os

from of_face._libs import preload as _preload

_preload()
# OneFlow groups ranks into machines by host address and places each by LOCAL_RANK. Several
# "nodes" simulated on one host (a multi-node rehearsal) all start at local rank 0 and collide:
# the second node's ranks then hold no data. OF_FACE_NODES_SHARE_HOST=1 makes every process's
# local rank its global rank, before OneFlow starts.
if os.environ.get("OF_FACE_NODES_SHARE_HOST") == "1" and "RANK" in os.environ:
    os.environ["LOCAL_RANK"] = os.environ["RANK"]
__version__ = "0.1.0"
