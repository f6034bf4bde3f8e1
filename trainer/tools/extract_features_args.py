"""Run a frozen pretrained backbone once over every split of a shard set and write a feature shard set.

Each output sample holds `{image_id}.npy` (np.save bytes of float16 [parts, channels]: the backbone's last
feature grid, cells row-major) in place of the picture, and the very same `{image_id}.json`. The shard files keep
their names and sample order; concepts.json and vocab.json are copied; manifest.json is the input's with
"image_ext": "npy" and an "image_features" record of the extraction, written last (its presence marks a complete
set). Training on the result reads the features only (no backbone in the step):

    python -m trainer.extract_features --shards data/emoji --out data/emoji_lite0 --encoder efficientnet_lite0
    python -m trainer.extract_features --shards s3://bucket/emoji --out data/emoji_lite0   # a URL set, streamed
    python -m trainer.train --config configs/emoji_efficientnet.yaml data.shards=data/emoji_lite0 \
        model.image_encoder=regions model.region_dim=1280 model.max_regions=49 model.region_dropout=0
"""
from __future__ import annotations

from usercli import DefaultsHelpFormatter, OneLineParser
from usercli.options import int_in

PROG = "python -m trainer.extract_features"
ENCODERS = ("efficientnet_lite0",)  # pretrained grid encoders: a from-scratch one has nothing to extract


def build_parser() -> OneLineParser:
    """The parser of `python -m trainer.extract_features` (no torch: `--help` answers at once)."""
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--shards", required=True, help="input shard set (pictures): a folder or its URL")
    parser.add_argument("--out", required=True, help="new folder for the feature shard set")
    parser.add_argument("--encoder", default=ENCODERS[0], choices=ENCODERS, help="the pretrained backbone")
    parser.add_argument("--image-size", type=int_in(32), default=224, help="pictures are resized to this square side")
    parser.add_argument("--batch-size", type=int_in(1), default=32, help="pictures per forward")
    parser.add_argument("--weights", default=None, help="backbone state dict (default: the installed package's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    return parser
