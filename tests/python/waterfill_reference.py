"""A plain-Python Waterfill written from reference/routing_waterfill.md sections 8.5-8.8 alone, rule
by rule, with a 32-bit-free candidate set: the tests and the benchmark compare moelb against it.
Slow and literal on purpose (one row at a time, Python integers)."""

from __future__ import annotations

import numpy as np

MIN_BATCH = 64
NUMER, DENOM = 11, 10


def shared_weight(rsf: float, folded: bool = False) -> np.float32:
    return np.float32(1.0 if folded or rsf == 0 else 1.0 / rsf)


def routed_counts(ids: np.ndarray, num_slots: int, num_ranks: int) -> list[int]:
    counts = [0] * num_ranks
    for i in ids.ravel():
        if i >= 0:
            counts[min(max(int(i) // num_slots, 0), num_ranks - 1)] += 1
    return counts


def active_markers(ids: np.ndarray, num_physical: int) -> list[int]:
    used = [0] * num_physical
    for i in ids.ravel():
        if i >= 0:
            used[int(i)] = 1
    return used


def exchange_buffer(ids, num_physical, num_ranks, rank, num_tokens, is_decode) -> list[int]:
    """What a rank contributes to the dynamic mode's all-reduce (section 8.6 step 2, 8.8)."""
    if is_decode:
        return active_markers(ids, num_physical)
    slots = num_physical // num_ranks
    one_hot = [0] * num_ranks
    one_hot[rank] = num_tokens
    return routed_counts(ids, slots, num_ranks) + one_hot


def plan(ids, num_physical, num_ranks, rank, num_tokens, is_decode, dynamic, reduced=None):
    """(kind, rank_load, target_total, allow_all, destination) as sections 8.6 and 8.8."""
    slots = num_physical // num_ranks
    n, k = ids.shape
    if not is_decode:
        if not dynamic:
            if num_tokens < MIN_BATCH:
                return ("local", [], 0, True, None)
            return ("token_count", routed_counts(ids, slots, num_ranks), 0, True, None)
        g, t = reduced[:num_ranks], reduced[num_ranks:]
        if num_tokens < MIN_BATCH:
            return ("local", [], 0, True, None)
        load = [g[w] + t[w] for w in range(num_ranks)]
        tokens_global = sum(g) // k
        target = (sum(load) + tokens_global + num_ranks - 1) // num_ranks
        return ("token_count", load, target, max(load) <= target, None)
    markers = reduced if dynamic else active_markers(ids, num_physical)
    load = [
        sum(1 for p in range(w * slots, (w + 1) * slots) if markers[p]) for w in range(num_ranks)
    ]
    if not dynamic and n <= 256 and slots <= 32:
        best = 0
        for w in range(num_ranks):
            if load[w] < load[best] or (load[w] == load[best] and w == rank):
                best = w
        return ("fused_fewest_active", load, 0, True, best)
    best, best_cnt = rank, load[rank]
    for w in range(num_ranks):
        if load[w] * NUMER < best_cnt * DENOM:
            best, best_cnt = w, load[w]
    for w in range(num_ranks):
        if load[w] < best_cnt:
            best, best_cnt = w, load[w]
    return ("fewest_active", load, 0, True, best)


def _hash(t: int, s: int) -> int:
    seed = (t & 0xFFFFFFFF) ^ ((s * 0x9E3779B9) & 0xFFFFFFFF)
    return (seed * 1664525 + 1013904223) & 0xFFFFFFFF


def choose(row_ids, t, p, num_ranks, rank, slots, k) -> int:
    """The token-count kernel's destination for row t (section 8.7)."""
    _, load, target_total, allow_all, _ = p
    target = target_total
    if target <= 0:
        tot = sum(load)
        target = (tot + tot // k + num_ranks - 1) // num_ranks
    valid_ranks = [min(max(int(i) // slots, 0), num_ranks - 1) for i in row_ids if i >= 0]
    best, best_cnt = rank, load[rank]
    for w in range(num_ranks) if allow_all else valid_ranks:
        if load[w] * NUMER < best_cnt * DENOM:
            best, best_cnt = w, load[w]
    candidates = range(num_ranks) if allow_all else sorted({rank, *valid_ranks})
    caps = []
    for w in candidates:
        cap = max(target - load[w], 0)
        if w != rank:
            cap = (cap * DENOM) // NUMER
        caps.append((w, cap))
    total = sum(c for _, c in caps)
    if total == 0:
        return best
    u = _hash(t, rank) % total
    cum = 0
    for w, cap in caps:
        if cum <= u < cum + cap:
            return w
        cum += cap
    raise AssertionError("unreachable")


def expand(
    ids,
    weights,
    num_physical,
    num_ranks,
    rank,
    rsf=1.0,
    num_tokens=None,
    is_decode=False,
    dynamic=False,
    reduced=None,
    folded=False,
):
    """(out_ids [N, K+1] int32, out_weights [N, K+1] float32, plan)."""
    n, k = ids.shape
    num_tokens = n if num_tokens is None else num_tokens
    slots = num_physical // num_ranks
    p = plan(ids, num_physical, num_ranks, rank, num_tokens, is_decode, dynamic, reduced)
    out_ids = np.full((n, k + 1), -1, dtype=np.int32)
    out_w = np.zeros((n, k + 1), dtype=np.float32)
    for t in range(n):
        row = ids[t]
        valid = False
        for c in range(k):
            if row[c] >= 0:
                out_ids[t, c] = row[c] + row[c] // slots
                out_w[t, c] = weights[t, c]
                valid = True
        if not valid:
            continue
        if p[0] == "local":
            dest = rank
        elif p[0] == "token_count":
            dest = choose(row, t, p, num_ranks, rank, slots, k)
        else:
            dest = p[4]
        out_ids[t, k] = dest * (slots + 1) + slots
        out_w[t, k] = shared_weight(rsf, folded)
    return out_ids, out_w, p
