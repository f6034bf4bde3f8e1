"""Retrieval with a trained run: export shard sets to a FAISS index folder, query it, or serve a search page.

Export the test split of a run's last checkpoint (any ZeRO stage; on every rank of a launch, e.g. torchrun):
    python -m trainer.retrieve export --run runs/builtin --out runs/builtin/index
    python -m trainer.retrieve export --run runs/builtin --split train --shards data/a data/b --out INDEX \
        --index-type auto          # several shard sets (as data.mix_shards names them), an approximate index
    python -m trainer.retrieve export --run runs/builtin --out INDEX --resume   # finish an interrupted export
Query it: a caption ranks pictures; a picture ranks captions (or pictures, with --find pictures):
    python -m trainer.retrieve query --index runs/builtin/index --text "a red star" --text "two circles" --k 5
    python -m trainer.retrieve query --index runs/builtin/index --image star.png --find pictures --json
    python -m trainer.retrieve query --index runs/builtin/index --interactive      # one query per stdin line
Search page on http://127.0.0.1:8000 (binds 127.0.0.1 unless --host says otherwise):
    python -m trainer.retrieve serve --index runs/builtin/index

The folder's layout is in trainer/retrieval/index_folder.py; vectors are the model's [sqrt(1 - a) g; sqrt(a) l], a
score is a dot product, as in evaluation. The local share a is the run's (chosen on its validation split under
model.local_score_weight=auto: trainer.eval.concat_weight); index.json records it and queries use it. The model is
loaded once per command, however many queries it answers.
"""
from __future__ import annotations

from trainer.eval.evaluate_args import add_checkpoint_arguments
from trainer.retrieval.faiss_index import KINDS
from usercli import DefaultsHelpFormatter, OneLineParser
from usercli.options import PORT, int_in

PROG = "trainer.retrieve"


def build_parser() -> OneLineParser:
    """The parser of `python -m trainer.retrieve` and its three commands (no torch, no faiss: `--help` answers at
    once)."""
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _export_arguments(_command(sub, "export", "embed shard sets with a run's checkpoint into a FAISS index folder"))
    qry = _command(sub, "query", "rank an index's pictures for a text, or its captions/pictures for a picture")
    qry.add_argument("--index", required=True, help="index folder written by `export`")
    qry.add_argument("--text", action="append", help="a caption (repeat for several): ranks pictures")
    qry.add_argument("--image", action="append", help="a picture file (repeat for several): ranks captions")
    qry.add_argument("--interactive", action="store_true", help="then read queries from stdin, one per line")
    qry.add_argument("--find", choices=("pictures", "captions"), default=None,
                     help="what to rank (default: pictures for --text, captions for --image)")
    qry.add_argument("--k", type=int_in(1), default=5, help="how many results")
    qry.add_argument("--json", action="store_true", help="one JSON object per query, for scripts")
    srv = _command(sub, "serve", "a local search page over an index folder")
    srv.add_argument("--index", required=True, help="index folder written by `export`")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int_in(*PORT), default=8000, help="port (0: any free one; the address is printed)")
    srv.add_argument("--max-query-chars", type=int_in(1), default=1000, help="longer text queries are refused (400)")
    srv.add_argument("--max-upload-mb", type=int_in(1, 1024), default=8,
                     help="larger picture uploads are refused (413)")
    return parser


def _command(sub, name: str, text: str) -> OneLineParser:
    return sub.add_parser(name, help=text, description=text, formatter_class=DefaultsHelpFormatter)


def _export_arguments(exp: OneLineParser) -> None:
    add_checkpoint_arguments(exp)
    exp.add_argument("--out", required=True, help="index folder to write")
    exp.add_argument("--shards", nargs="+", metavar="ROOT",
                     help="shard sets to index, folders or URLs, as data.mix_shards names them (default: the run's "
                          "data.shards); "
                          "all share the run's vocabulary")
    exp.add_argument("--index-type", default="flat", choices=KINDS,
                     help="flat: exact (default); hnsw / ivf: approximate; auto: hnsw or ivf by size")
    exp.add_argument("--batch-size", type=int_in(1), default=None,
                     help="pictures per forward (default: the run's data.eval_batch_size)")
    again = exp.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="finish an interrupted export (written pieces are kept)")
    again.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
