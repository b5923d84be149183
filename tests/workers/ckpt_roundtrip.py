"""Load a checkpoint (Global.resume) into a freshly built run and save it again at once, with no
step in between: what comes out must equal what went in, on any world size.

argv: -c CONFIG [-o Section.key=value ...], as of_face.train.main.
"""
from of_face.config import load_config
from of_face.train.main import parse_args
from of_face.train.trainer import Trainer

args = parse_args()
trainer = Trainer(load_config(args.config, args.override))
trainer.save_checkpoint(*trainer.start)
