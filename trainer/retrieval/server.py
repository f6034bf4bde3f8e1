"""The search page of `python -m trainer.retrieve serve --index DIR`: Flask (HTTP parsing is Werkzeug's).

Routes:
    GET  /                     the page (trainer/retrieval/static/search.html)
    GET  /api/info             index.json's summary and the limits the page shows
    GET  /api/search?q=&k=     a caption ranks pictures                                  (400: empty, too long)
    POST /api/search_image     multipart "picture" (+ "find": captions|pictures, "k")     (413: too large)
    GET  /image/<row>          picture row <row> of the index, read from its shard by key (404 out of range)
Only pictures the index names are served, by row number: no part of a request ever becomes a file path. The
server binds 127.0.0.1 unless told otherwise, as a development server should; put a real WSGI server in front
before exposing it (create_app returns a WSGI application).
"""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from trainer.retrieval.answers import search
from trainer.retrieval.query import QueryError

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 100


def _error(status: int, message: str):
    response = jsonify(error=message)
    response.status_code = status
    return response


def _k(value) -> int:
    try:
        k = int(value if value not in (None, "") else 12)
    except ValueError:
        raise QueryError(f"k must be a whole number, got {str(value)[:20]!r}") from None
    if not 1 <= k <= MAX_K:
        raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def _with_urls(answer: dict) -> dict:
    """Each hit's picture as a URL by row (the page never sees a file name it could send back)."""
    for hit in answer["hits"]:
        row = hit["row"] if answer["find"] == "pictures" else hit["image_row"]
        hit["image_url"] = f"/image/{row}"
        hit.pop("shard", None)  # the server's file layout stays on the server; key and image id remain
    return answer


def create_app(index, encoder, *, max_query_chars: int = 1000, max_upload_bytes: int = 8 << 20) -> Flask:
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes  # Werkzeug refuses a larger body with 413
    meta = index.meta

    @app.get("/")
    def page():
        return send_from_directory(STATIC, "search.html")

    @app.get("/api/info")
    def info():
        return jsonify(split=meta["split"], sets=[Path(s).name for s in meta["sets"]], step=meta["step"],
                       checkpoint=meta["checkpoint_tag"], counts=meta["counts"], index=meta["index"]["images"]["type"],
                       max_query_chars=max_query_chars, max_upload_bytes=max_upload_bytes,
                       local_share=meta.get("local_share"))  # the concatenation's mix (null: global vectors only)

    @app.get("/api/search")
    def search_text():
        text = request.args.get("q", "")
        if len(text) > max_query_chars:
            return _error(400, f"the query has {len(text)} characters; at most {max_query_chars} are accepted")
        try:
            return jsonify(_with_urls(search(index, encoder, text=text, k=_k(request.args.get("k")))))
        except QueryError as e:
            return _error(400, str(e))

    @app.post("/api/search_image")
    def search_picture():
        upload = request.files.get("picture")
        if upload is None:
            return _error(400, "send the picture as the multipart field 'picture'")
        find = request.form.get("find", "captions")
        if find not in ("captions", "pictures"):
            return _error(400, f"find must be captions or pictures, got {find[:20]!r}")
        name = Path(upload.filename or "upload").name[:100]  # for messages only, never opened
        try:
            return jsonify(_with_urls(search(index, encoder, picture=upload.read(), name=name, find=find,
                                             k=_k(request.form.get("k")))))
        except QueryError as e:
            return _error(400, str(e))

    @app.get("/image/<int:row>")
    def picture(row: int):
        try:
            data, mime = index.picture(row)
        except IndexError as e:
            return _error(404, str(e))
        except LookupError as e:
            return _error(404, str(e))
        return data, 200, {"Content-Type": mime, "Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"}

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_):
        return _error(413, f"the upload is larger than {max_upload_bytes >> 20} MB (serve --max-upload-mb)")

    @app.errorhandler(HTTPException)
    def http_error(e):
        return _error(e.code or 500, e.description or e.name)

    return app


def run_server(app: Flask, host: str, port: int) -> None:
    """Serve until interrupted; prints the address (with the port chosen, for --port 0) on one line."""
    from werkzeug.serving import make_server

    server = make_server(host, port, app, threaded=True)
    print(f"serving the search page on http://{host}:{server.server_port}/ (Ctrl-C stops)", flush=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
