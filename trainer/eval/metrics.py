"""Retrieval metrics (Recall@K both ways, rSum) as pure functions over precomputed embeddings.

Protocol (docs/design.md section 4, as in VSE++ / VSE-infinity): image->text uses the rank of the best of an
image's captions, text->image the rank of the caption's image. Scores are inner products, computed in chunks
so that the full [images, captions] matrix never exists: an evaluation set of 5K images and 25K captions
would otherwise need 500 MB per score matrix.

Ties count against the model: a candidate that scores exactly as high as the match is ranked above it.
Without that, a collapsed model (every score equal) would report 100% recall.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

DEFAULT_KS = (1, 5, 10)


def retrieval_ranks(img_vecs: Tensor, cap_vecs: Tensor, cap_to_img: Tensor, chunk_size: int = 256
                    ) -> tuple[Tensor, Tensor]:
    """0-based ranks (int64, on the embeddings' device): ([I] image->text, [C] text->image).

    i2t rank of image i: number of non-matching captions scoring >= the best of image i's own captions.
    t2i rank of caption c: number of non-matching images scoring >= caption c's own image.
    """
    _check_embeddings(img_vecs, cap_vecs, "img_vecs", "cap_vecs")
    return combined_retrieval_ranks([img_vecs], [cap_vecs], {"score": (1.0,)}, cap_to_img, chunk_size)["score"]


def combined_retrieval_ranks(img_spaces: Sequence[Tensor], cap_spaces: Sequence[Tensor],
                             scores: dict[Hashable, Sequence[float]], cap_to_img: Tensor, chunk_size: int = 256
                             ) -> dict[Hashable, tuple[Tensor, Tensor]]:
    """Ranks as `retrieval_ranks` for several scores at once, each a weighted sum of per-space inner products:
    scores[name] = (w_0, w_1, ...) scores a pair with sum_k w_k <img_spaces[k], cap_spaces[k]> (any hashable
    name: a string, or the local share of a mix).

    One pass over tiles of the score matrices: image blocks of chunk_size rows against the caption blocks
    that belong to each image block (captions grouped by image), so every inner product is computed once
    for all scores and both directions, and no tile is larger than chunk_size x (captions of chunk_size
    images). The diagonal tiles (a block's images against its own captions) come first: they hold every
    own score, so the off-diagonal tiles only count the candidates at or above them.
    """
    _check_scores(img_spaces, cap_spaces, scores, chunk_size)
    num_images, num_captions = img_spaces[0].shape[0], cap_spaces[0].shape[0]
    device = img_spaces[0].device
    cap_to_img = _check_cap_to_img(cap_to_img, num_images, num_captions).to(device)
    imgs = [x.to(device=device, dtype=torch.float32) for x in img_spaces]
    caps = [x.to(device=device, dtype=torch.float32) for x in cap_spaces]
    order = None
    if bool((cap_to_img[1:] < cap_to_img[:-1]).any()):  # group captions by image (copies the caption vectors)
        order = torch.argsort(cap_to_img, stable=True)
        cap_to_img, caps = cap_to_img[order], [x[order] for x in caps]
    starts = list(range(0, num_images, chunk_size))
    img_ranges = [(a, min(a + chunk_size, num_images)) for a in starts]
    bounds = torch.searchsorted(cap_to_img, torch.tensor(starts + [num_images], device=device)).tolist()
    cap_ranges = list(zip(bounds[:-1], bounds[1:]))

    i2t = {name: torch.zeros(num_images, dtype=torch.int64, device=device) for name in scores}
    t2i = {name: torch.zeros(num_captions, dtype=torch.int64, device=device) for name in scores}
    best_own = {name: torch.empty(num_images, device=device) for name in scores}
    own = {name: torch.empty(num_captions, device=device) for name in scores}

    def tiles(ib: int, cb: int):
        (i0, i1), (c0, c1) = img_ranges[ib], cap_ranges[cb]
        products = [img[i0:i1] @ cap[c0:c1].T for img, cap in zip(imgs, caps)]
        for name, weights in scores.items():
            yield name, _weighted_sum(products, weights), (i0, i1), (c0, c1)

    for block in range(len(img_ranges)):  # diagonal tiles: own scores, and the counts inside the block
        for name, tile, (i0, i1), (c0, c1) in tiles(block, block):
            is_own = (cap_to_img[c0:c1] - i0).unsqueeze(0) == torch.arange(i1 - i0, device=device).unsqueeze(1)
            # Own and negative scores come from one product, so equal scores compare equal.
            best = tile.masked_fill(~is_own, -math.inf).amax(dim=1)
            mine = tile.gather(0, (cap_to_img[c0:c1] - i0).unsqueeze(0)).squeeze(0)
            best_own[name][i0:i1], own[name][c0:c1] = best, mine
            i2t[name][i0:i1] += _count(((tile >= best.unsqueeze(1)) & ~is_own), dim=1)
            t2i[name][c0:c1] += _count(tile >= mine.unsqueeze(0), dim=0) - 1  # the own image always counts once
    for ib in range(len(img_ranges)):  # off-diagonal tiles: every candidate is a non-match
        for cb in range(len(cap_ranges)):
            if ib == cb:
                continue
            for name, tile, (i0, i1), (c0, c1) in tiles(ib, cb):
                i2t[name][i0:i1] += _count(tile >= best_own[name][i0:i1].unsqueeze(1), dim=1)
                t2i[name][c0:c1] += _count(tile >= own[name][c0:c1].unsqueeze(0), dim=0)
    if order is not None:
        for name in scores:
            t2i[name] = torch.empty_like(t2i[name]).index_copy_(0, order, t2i[name])
    return {name: (i2t[name], t2i[name]) for name in scores}


def _check_scores(img_spaces: Sequence[Tensor], cap_spaces: Sequence[Tensor], scores: dict[Hashable, Sequence[float]],
                  chunk_size: int) -> None:
    """combined_retrieval_ranks' arguments: a positive chunk size, paired spaces, one weight per space."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(img_spaces) != len(cap_spaces) or not img_spaces:
        raise ValueError(f"need as many image as caption spaces (>= 1); got {len(img_spaces)} and {len(cap_spaces)}")
    for name, weights in scores.items():
        if len(weights) != len(img_spaces):
            raise ValueError(f"score {name!r} has {len(weights)} weights for {len(img_spaces)} spaces")


def _count(mask: Tensor, dim: int) -> Tensor:
    """True entries along dim. int32 sums are 2-3x faster on CPU than bool.sum()'s int64 copy; a tile's counts
    are far below 2^31."""
    return mask.sum(dim=dim, dtype=torch.int32)


def _weighted_sum(products: list[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_k w_k products[k], skipping zero weights; a lone product of weight 1 is returned as is (no copy)."""
    terms = [(product, weight) for product, weight in zip(products, weights) if weight != 0.0]
    if not terms:
        return torch.zeros_like(products[0])
    (first, weight), rest = terms[0], terms[1:]
    if weight != 1.0:
        total = first * weight
    elif rest:
        (second, weight2), rest = rest[0], rest[1:]
        total = torch.add(first, second, alpha=weight2)
    else:
        return first
    for product, weight in rest:
        total.add_(product, alpha=weight)
    return total


def recalls(i2t_ranks: Tensor, t2i_ranks: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K in percent for each K and direction, plus rsum (their sum)."""
    ks = _check_ks(ks)
    out: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        if ranks.ndim != 1 or ranks.numel() == 0:
            raise ValueError(f"{direction}_ranks must be a non-empty 1-D tensor, got shape {tuple(ranks.shape)}")
        for k in ks:
            out[f"{direction}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
    out["rsum"] = sum(out.values())
    return out


def chance_recalls(caps_per_image: Tensor | Sequence[int], ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Expected recalls (percent) of a scorer that ranks candidates uniformly at random.

    i2t for an image with m of C captions: 1 - C(C-m, K) / C(C, K) (some own caption in the top K),
    averaged over images; t2i: min(K, I) / I.
    """
    ks = _check_ks(ks)
    counts = torch.as_tensor(caps_per_image, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"caps_per_image must be a non-empty 1-D list, got shape {tuple(counts.shape)}")
    if counts.min() < 1 or not torch.equal(counts, counts.round()):
        bad = torch.nonzero((counts < 1) | (counts != counts.round())).flatten()[:10].tolist()
        raise ValueError(f"caps_per_image must be whole numbers >= 1; images {bad} are not")
    num_images, num_captions = counts.numel(), int(counts.sum().item())
    out: dict[str, float] = {}
    for k in ks:
        # C(C-m, K) / C(C, K) = prod_{j<K} (C-m-j) / (C-j); a factor hits 0 (and stays there) once
        # j reaches C-m < C, so the denominators used are always positive.
        miss = torch.ones_like(counts)
        for j in range(min(k, num_captions)):
            miss = miss * (num_captions - counts - j).clamp(min=0) / (num_captions - j)
        out[f"i2t_r{k}"] = 100.0 * (1.0 - miss).mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * min(k, num_images) / num_images
    out["rsum"] = sum(out.values())
    return out


def evaluate_embeddings(img_g: Tensor, img_l: Tensor | None, cap_g: Tensor, cap_l: Tensor | None,
                        cap_to_img: Tensor, local_share: float = 0.5, chunk_size: int = 256
                        ) -> dict[str, dict[str, float]]:
    """Recalls of the global, local and concatenated scores: {"global": ..., "local": ..., "concat": ...}.

    concat scores with [sqrt(1 - a) g; sqrt(a) l] (a = local_share, trainer.eval.concat_weight), the exported
    retrieval vector, i.e. (1 - a) <g_v,g_t> + a <l_v,l_t>. With img_l and cap_l both None only "global" is
    returned.
    """
    if img_l is None and cap_l is None:
        _check_embeddings(img_g, cap_g, "img_g", "cap_g")
        return {"global": recalls(*retrieval_ranks(img_g, cap_g, cap_to_img, chunk_size))}
    by_share = mix_recalls(img_g, img_l, cap_g, cap_l, cap_to_img, (0.0, 1.0, local_share), chunk_size)
    return {"global": by_share[0.0], "local": by_share[1.0], "concat": by_share[local_share]}


def mix_recalls(img_g: Tensor, img_l: Tensor, cap_g: Tensor, cap_l: Tensor, cap_to_img: Tensor,
                shares: Sequence[float], chunk_size: int = 256) -> dict[float, dict[str, float]]:
    """Recalls of the mixed score (1 - a) <g_v,g_t> + a <l_v,l_t> for each local share a in `shares`, in one pass
    over the tiles (a = 0: the global space alone, a = 1: the local space alone)."""
    if img_l is None or cap_l is None:
        raise ValueError("img_l and cap_l must both be given or both be None; got only "
                         + ("cap_l" if img_l is None else "img_l"))
    for share in shares:
        if not 0.0 <= share <= 1.0:  # also nan
            raise ValueError(f"local_share must be in [0, 1], got {share}")
    _check_embeddings(img_g, cap_g, "img_g", "cap_g")
    _check_embeddings(img_l, cap_l, "img_l", "cap_l")
    for name_a, a, name_b, b in (("img_g", img_g, "img_l", img_l), ("cap_g", cap_g, "cap_l", cap_l)):
        if a.shape[0] != b.shape[0]:  # both already checked above: only the row counts are left to compare
            raise ValueError(f"{name_a} has {a.shape[0]} rows but {name_b} has {b.shape[0]}")
    # Every mix is a weighted sum of the two spaces' products: one pass scores them all.
    ranks = combined_retrieval_ranks([img_g, img_l], [cap_g, cap_l],
                                     {share: (1.0 - share, share) for share in dict.fromkeys(shares)},
                                     cap_to_img, chunk_size)
    return {share: recalls(*pair) for share, pair in ranks.items()}


def concat_rows(g: Tensor, l: Tensor, local_share: float) -> Tensor:
    """[sqrt(1 - a) g; sqrt(a) l]: rows whose inner products are the mixed score of share a."""
    return torch.cat([math.sqrt(1.0 - local_share) * g, math.sqrt(local_share) * l], dim=-1)


def format_table(results: dict[str, dict[str, float]], chance: dict[str, float] | None = None) -> str:
    """Fixed-width table: one row per score (then "chance" if given), R@K for i2t and t2i, then rSum."""
    rows = dict(results)
    if chance is not None:
        if "chance" in rows:
            raise ValueError('results already has a row named "chance"')
        rows["chance"] = chance
    if not rows:
        raise ValueError("nothing to format: results is empty")
    first = next(iter(rows.values()))
    columns = [key for key in first if key != "rsum"] + ["rsum"]
    for name, row in rows.items():
        if set(row) != set(columns):
            raise ValueError(f"row {name!r} has keys {sorted(row)}, expected {sorted(columns)}")
    name_width = max(len("score"), *(len(name) for name in rows))
    headers = [_column_title(key) for key in columns]
    width = max(9, *(len(h) for h in headers))
    lines = [f"{'score':<{name_width}}" + "".join(f"{h:>{width + 1}}" for h in headers)]
    lines.append("-" * len(lines[0]))
    for name, row in rows.items():
        lines.append(f"{name:<{name_width}}" + "".join(f"{row[key]:>{width + 1}.2f}" for key in columns))
    return "\n".join(lines)


def _column_title(key: str) -> str:
    if key == "rsum":
        return "rSum"
    direction, k = key.split("_r")
    return f"{direction} R@{k}"


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct integers >= 1, got {ks}")
    return ks


def _check_embeddings(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    for name, x in ((name_a, a), (name_b, b)):
        if x.ndim != 2 or x.shape[0] == 0 or not x.is_floating_point():
            raise ValueError(f"{name} must be a non-empty float [N, D] tensor, got {x.dtype} {tuple(x.shape)}")
        # in row blocks: isfinite of a whole [25000, 1024] matrix makes a 100 MB float copy (abs) on the CPU
        for start in range(0, x.shape[0], 4096):
            if not torch.isfinite(x[start:start + 4096]).all():
                bad = torch.nonzero(~torch.isfinite(x).all(dim=1)).flatten()[:10].tolist()
                raise ValueError(f"{name} has non-finite values in rows {bad}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} has dimension {a.shape[1]} but {name_b} has {b.shape[1]}")


def _check_cap_to_img(cap_to_img: Tensor, num_images: int, num_captions: int) -> Tensor:
    if cap_to_img.shape != (num_captions,) or cap_to_img.is_floating_point() or cap_to_img.dtype == torch.bool:
        raise ValueError(f"cap_to_img must be an integer tensor of shape ({num_captions},) (one entry per "
                         f"caption), got {cap_to_img.dtype} {tuple(cap_to_img.shape)}")
    cap_to_img = cap_to_img.long()
    out_of_range = (cap_to_img < 0) | (cap_to_img >= num_images)
    if out_of_range.any():
        bad = torch.nonzero(out_of_range).flatten()[:10].tolist()
        raise ValueError(f"cap_to_img has image indices outside 0..{num_images - 1} at captions {bad}: "
                         f"{cap_to_img[bad].tolist()}")
    uncaptioned = torch.bincount(cap_to_img, minlength=num_images) == 0
    if uncaptioned.any():
        bad = torch.nonzero(uncaptioned).flatten()
        raise ValueError(f"{bad.numel()} of {num_images} images have no caption in cap_to_img: "
                         f"{bad[:10].tolist()}")
    return cap_to_img


# ------------------------------------------------------------------------------- plausible matches (PCME's PMRP)
PMRP_DISTANCES = (0, 1, 2)


def object_classes(objects_per_image: Sequence[Sequence[dict]], keys: Sequence[str] = ("colour", "shape")) -> Tensor:
    """[I, K] 0/1 presence of each object class in each picture; a class is the tuple of `keys` of an object
    ("red star"), or its "class" where a source names it outright (the emoji corpus: "subgroup:face-smiling"),
    K the classes seen in these pictures. Ground truth of what is drawn, not of caption words."""
    names = [[(str(o["class"]),) if "class" in o else tuple(str(o[k]) for k in keys) for o in objects]
             for objects in objects_per_image]
    vocab = {name: i for i, name in enumerate(sorted({n for per_image in names for n in per_image}))}
    out = torch.zeros(len(names), max(len(vocab), 1))
    for row, per_image in enumerate(names):
        for name in per_image:
            out[row, vocab[name]] = 1.0
    return out


def _class_distance(a: Tensor, b: Tensor) -> Tensor:
    """Hamming distance between 0/1 class vectors: [n, K] x [m, K] -> [n, m] (classes in one and not the other)."""
    return a.sum(1, keepdim=True) + b.sum(1).unsqueeze(0) - 2 * (a @ b.T)


def _r_precision(scores: Tensor, relevant: Tensor) -> Tensor:
    """[q] precision of each row's top R items, R = its relevant count (>= 1). Ties count against the model:
    among equal scores the irrelevant items are ranked first, so a collapsed scorer gets chance, not 1."""
    order = torch.argsort(relevant.to(torch.int8), dim=1, stable=True)  # irrelevant first ...
    order = order.gather(1, torch.argsort(scores.gather(1, order), dim=1, descending=True, stable=True))
    hits = relevant.gather(1, order).to(torch.int32).cumsum(1)
    r = relevant.sum(1, dtype=torch.int64).clamp(min=1)
    return hits.gather(1, (r - 1).unsqueeze(1)).squeeze(1).double() / r.double()


def plausible_match_precision(img_vecs: Tensor, cap_vecs: Tensor, cap_to_img: Tensor, classes: Tensor,
                              distances: Sequence[int] = PMRP_DISTANCES, chunk_size: int = 256) -> dict[str, float]:
    """PMRP (Chun et al., PCME, 2021) in percent: R-precision where an item counts as relevant when its picture's
    object classes differ from the query's in at most z classes (a caption inherits its picture's classes), for
    each z in `distances`, both directions: i2t_z0, t2i_z0, ...; "pmrp" is their mean. The pair itself is
    always relevant (distance 0), so R >= 1 for every query."""
    _check_embeddings(img_vecs, cap_vecs, "img_vecs", "cap_vecs")
    cap_to_img = _check_cap_to_img(cap_to_img, img_vecs.shape[0], cap_vecs.shape[0])
    if classes.ndim != 2 or classes.shape[0] != img_vecs.shape[0]:
        raise ValueError(f"classes must be [{img_vecs.shape[0]}, K] (one row per picture), got {tuple(classes.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # the classes come from the shards' json (host memory); the embeddings may sit on a GPU: one device for all
    imgs, caps = img_vecs.float(), cap_vecs.float()
    classes, cap_to_img = classes.float().to(imgs.device), cap_to_img.to(imgs.device)
    totals = {f"{d}_z{z}": 0.0 for z in distances for d in ("i2t", "t2i")}
    for start in range(0, imgs.shape[0], chunk_size):  # image queries against every caption
        block = slice(start, start + chunk_size)
        scores = imgs[block] @ caps.T
        dist = _class_distance(classes[block], classes)[:, cap_to_img]
        for z in distances:
            totals[f"i2t_z{z}"] += _r_precision(scores, dist <= z).sum().item()
    for start in range(0, caps.shape[0], chunk_size):  # caption queries against every image
        block = slice(start, start + chunk_size)
        scores = caps[block] @ imgs.T
        dist = _class_distance(classes[cap_to_img[block]], classes)
        for z in distances:
            totals[f"t2i_z{z}"] += _r_precision(scores, dist <= z).sum().item()
    out = {key: 100.0 * value / (imgs.shape[0] if key.startswith("i2t") else caps.shape[0])
           for key, value in totals.items()}
    out["pmrp"] = sum(out.values()) / len(out)
    return out


def plausible_match_scores(img_g: Tensor, img_l: Tensor | None, cap_g: Tensor, cap_l: Tensor | None,
                           cap_to_img: Tensor, classes: Tensor, local_share: float = 0.5) -> dict[str, dict]:
    """plausible_match_precision of the global, local and concatenated ([sqrt(1 - a) g; sqrt(a) l]) scores."""
    spaces = {"global": (img_g, cap_g)}
    if img_l is not None and cap_l is not None:
        spaces["local"] = (img_l, cap_l)
        spaces["concat"] = (concat_rows(img_g, img_l, local_share), concat_rows(cap_g, cap_l, local_share))
    return {name: plausible_match_precision(i, c, cap_to_img, classes) for name, (i, c) in spaces.items()}


# ------------------------------------------------------------------------------- COCO 1K: mean over folds
def _rows_or_none(x: Tensor | None, rows: slice | Tensor) -> Tensor | None:
    """`x[rows]`, or None for an absent (global-only) local part."""
    return None if x is None else x[rows]


def fold_average(img_g: Tensor, img_l: Tensor | None, cap_g: Tensor, cap_l: Tensor | None, cap_to_img: Tensor,
                 local_share: float = 0.5, fold_size: int = 1000) -> dict[str, dict[str, float]]:
    """evaluate_embeddings on consecutive folds of `fold_size` pictures (with their captions), averaged: the
    COCO 1K protocol (five folds of a 5K split). The number of pictures must be a multiple of fold_size."""
    num_images = img_g.shape[0]
    if fold_size < 1 or num_images % fold_size:
        raise ValueError(f"{num_images} pictures do not split into folds of {fold_size}")
    cap_to_img = _check_cap_to_img(cap_to_img, num_images, cap_g.shape[0])
    per_fold = []
    for start in range(0, num_images, fold_size):
        fold_images = slice(start, start + fold_size)
        in_fold = (cap_to_img >= start) & (cap_to_img < start + fold_size)
        per_fold.append(evaluate_embeddings(img_g[fold_images], _rows_or_none(img_l, fold_images),
                                            cap_g[in_fold], _rows_or_none(cap_l, in_fold), cap_to_img[in_fold] - start,
                                            local_share))
    return {score: {key: sum(fold[score][key] for fold in per_fold) / len(per_fold) for key in per_fold[0][score]}
            for score in per_fold[0]}
