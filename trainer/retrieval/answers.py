"""One query's answer from an opened index (trainer.retrieval.index_folder) and a query encoder
(trainer.retrieval.query), as data for scripts and the search page, or as aligned text for people. Used by
`trainer.retrieve query` and `serve`."""
from __future__ import annotations

from pathlib import Path

from trainer.retrieval.query import QueryError, shorten

ANSWERS = {"text": "pictures", "image": "captions"}  # what a query ranks unless told otherwise


def search(index, encoder, *, text: str | None = None, picture: bytes | None = None, name: str = "picture",
           find: str | None = None, k: int = 5) -> dict:
    """One query's answer: {"query", "kind", "find", "notes", "hits"}; every hit names its row, and pictures
    their shard file and key. QueryError for a query the model cannot answer."""
    kind = "text" if text is not None else "image"
    find = find or ANSWERS[kind]
    if k < 1:
        raise QueryError(f"--k must be at least 1, got {k}")
    if text is not None:
        vector, notes = encoder.text(text)
    else:
        vector, notes = encoder.picture(picture, name), []
    side = "images" if find == "pictures" else "captions"
    scores, rows = index.search(side, vector[None], k)
    hits = []
    for rank, (score, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), 1):
        if row < 0:  # an approximate index may find fewer than k
            continue
        hit = {"rank": rank, "score": round(float(score), 6), "row": int(row)}
        if side == "images":
            record = index.rows["images"][row]
            hit.update(image_id=record["image_id"], caption=record["caption"], shard=record["shard"], key=record["key"])
        else:
            caption = index.rows["captions"][row]
            picture_record = index.rows["images"][caption["image_row"]]
            hit.update(caption=caption["text"], image_row=caption["image_row"], image_id=picture_record["image_id"])
        hits.append(hit)
    return {"query": text if text is not None else name, "kind": kind, "find": find, "notes": notes, "hits": hits}


def format_answer(answer: dict) -> str:
    """A header naming the query (shortened) and any notes, then one aligned row per hit."""
    query = repr(shorten(answer["query"])) if answer["kind"] == "text" else answer["query"]
    lines = [f"top {len(answer['hits'])} {answer['find']} for {query}"]
    lines += [f"  note: {note}" for note in answer["notes"]]
    if answer["find"] == "pictures":
        header = ("rank", "score", "image id", "shard:key", "first caption")
        rows = [(str(h["rank"]), f"{h['score']:+.4f}", h["image_id"], f"{Path(h['shard']).name}:{h['key']}",
                 shorten(h["caption"], 60)) for h in answer["hits"]]
    else:
        header = ("rank", "score", "image id", "caption")
        rows = [(str(h["rank"]), f"{h['score']:+.4f}", h["image_id"], shorten(h["caption"], 80))
                for h in answer["hits"]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = [r[0].rjust(widths[0]), r[1].rjust(widths[1])] + [c.ljust(w) for c, w in zip(r[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
