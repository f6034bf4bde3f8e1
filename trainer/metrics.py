"""Retrieval metrics (Recall@K both ways, rSum) as pure functions over precomputed embeddings.

Protocol (DESIGN.md section 4, as in VSE++ / VSE-infinity): image->text uses the rank of the best of an
image's captions, text->image the rank of the caption's image. Scores are inner products, computed in chunks
so that the full [images, captions] matrix never exists: an evaluation set of 5K images and 25K captions
would otherwise need 500 MB per score matrix.

Ties count against the model: a candidate that scores exactly as high as the match is ranked above it.
Without that, a collapsed model (every score equal) would report 100% recall.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_KS = (1, 5, 10)


def retrieval_ranks(img_vecs: Tensor, cap_vecs: Tensor, cap_to_img: Tensor, chunk_size: int = 1024
                    ) -> tuple[Tensor, Tensor]:
    """0-based ranks (int64, on the embeddings' device): ([I] image->text, [C] text->image).

    i2t rank of image i: number of non-matching captions scoring >= the best of image i's own captions.
    t2i rank of caption c: number of non-matching images scoring >= caption c's own image.
    """
    _check_embeddings(img_vecs, cap_vecs, "img_vecs", "cap_vecs")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_images, num_captions = img_vecs.shape[0], cap_vecs.shape[0]
    device = img_vecs.device
    cap_to_img = _check_cap_to_img(cap_to_img, num_images, num_captions).to(device)
    img = img_vecs.to(device=device, dtype=torch.float32)
    cap = cap_vecs.to(device=device, dtype=torch.float32)

    i2t = torch.empty(num_images, dtype=torch.int64, device=device)
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        scores = img[start:stop] @ cap.T  # [chunk, C]
        rows = torch.arange(start, stop, device=device)
        own = cap_to_img[None, :] == rows[:, None]
        # The best own score comes from the same matrix as the negatives, so equal scores compare equal.
        best_own = scores.masked_fill(~own, -math.inf).amax(dim=1, keepdim=True)
        i2t[start:stop] = ((scores >= best_own) & ~own).sum(dim=1)

    t2i = torch.empty(num_captions, dtype=torch.int64, device=device)
    for start in range(0, num_captions, chunk_size):
        stop = min(start + chunk_size, num_captions)
        scores = cap[start:stop] @ img.T  # [chunk, I]
        own_score = scores.gather(1, cap_to_img[start:stop, None])
        # The own image always satisfies >= (scores are finite), so subtract it once.
        t2i[start:stop] = (scores >= own_score).sum(dim=1) - 1
    return i2t, t2i


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
                        cap_to_img: Tensor, local_weight: float = 1.0, chunk_size: int = 1024
                        ) -> dict[str, dict[str, float]]:
    """Recalls of the global, local and concatenated scores: {"global": ..., "local": ..., "concat": ...}.

    concat scores with [g; sqrt(w) l], the exported retrieval vector, i.e. <g_v,g_t> + w <l_v,l_t>.
    With img_l and cap_l both None only "global" is returned.
    """
    results = {"global": recalls(*retrieval_ranks(img_g, cap_g, cap_to_img, chunk_size))}
    if img_l is None and cap_l is None:
        return results
    if img_l is None or cap_l is None:
        raise ValueError("img_l and cap_l must both be given or both be None; got only "
                         + ("cap_l" if img_l is None else "img_l"))
    if not (math.isfinite(local_weight) and local_weight >= 0):
        raise ValueError(f"local_weight must be finite and >= 0, got {local_weight}")
    _check_embeddings(img_g, img_l, "img_g", "img_l", same_rows=True)
    _check_embeddings(cap_g, cap_l, "cap_g", "cap_l", same_rows=True)
    results["local"] = recalls(*retrieval_ranks(img_l, cap_l, cap_to_img, chunk_size))
    scale = math.sqrt(local_weight)
    img_cat = torch.cat([img_g.float(), scale * img_l.float()], dim=1)
    cap_cat = torch.cat([cap_g.float(), scale * cap_l.float()], dim=1)
    results["concat"] = recalls(*retrieval_ranks(img_cat, cap_cat, cap_to_img, chunk_size))
    return results


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


def _check_embeddings(a: Tensor, b: Tensor, name_a: str, name_b: str, same_rows: bool = False) -> None:
    for name, x in ((name_a, a), (name_b, b)):
        if x.ndim != 2 or x.shape[0] == 0 or not x.is_floating_point():
            raise ValueError(f"{name} must be a non-empty float [N, D] tensor, got {x.dtype} {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            bad = torch.nonzero(~torch.isfinite(x).all(dim=1)).flatten()[:10].tolist()
            raise ValueError(f"{name} has non-finite values in rows {bad}")
    if same_rows:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{name_a} has {a.shape[0]} rows but {name_b} has {b.shape[0]}")
    elif a.shape[1] != b.shape[1]:
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
