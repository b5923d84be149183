"""of_face: ArcFace/CosFace training with PartialFC on OneFlow (nn.Graph over global tensors)."""
from of_face._libs import preload as _preload

_preload()
__version__ = "0.1.0"
