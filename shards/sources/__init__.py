"""Shard sources for real corpora, one module per layout, registered in shards.build.SOURCES.

karpathy (Karpathy-split JSON), coco (COCO captions files), table (`--source csv`: CSV/TSV), hf (Hugging Face
`datasets` on disk or local files), scan_precomp (SCAN's BUTD features), wds_relabel (img2dataset tars), openmoji
(the OpenMoji npm package: SVG emoji with CLDR annotations, keywords and its authors' tags).
Shared parts: base (Item, Source, Problems), pictures (byte-preserving checks), checking (the checking pass).
"""
