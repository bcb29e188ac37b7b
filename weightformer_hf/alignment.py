"""Data-free weight matching (Git Re-Basin, Ainsworth et al. 2023) of a teacher to the anchor.

Independently trained teachers compute the same function under many channel orders. Given a family's
permutation spec, `weight_matching` finds for every channel-order group the permutation that best lines
up another teacher's weights with the anchor's (coordinate ascent, one linear assignment per group), and
`permute_tensor` applies it to one tensor at a time, so aligned teachers are never held in memory whole.

Cost: each tensor is read once into a matmul-friendly layout (or, for lazy safetensors teachers, streamed
again from disk when needed, so matching holds neither teacher whole), tensors that touch only one group
contribute a constant computed once, and a group is solved again only when the permutation of a group it
shares a tensor with has changed since its last solve (which would give the same assignment). This is the
same coordinate ascent as `ALGORITHM_VERSION` 1, with the same stopping rule.

`align_to_anchor` adds two caches: in memory (`TeacherSet.alignment_cache`) and on disk
(`cache_root() / "alignments"`, one safetensors file of permutation indices per teacher pair, keyed by
content: `repo@sha`, the local folder's content hash, or a hash of the tensors of in-memory teachers).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .allocator import release_free_memory
from .families import PermutationSpec
from .weight_files import is_lazy

# Bump when a change could alter the permutations found: the disk cache key includes it. (4: wide square
# contributions are kept and updated too, which changes the last bits of their costs.)
ALGORITHM_VERSION = 4
# Contributions to the cost of a group at least this wide whose inner dimension is at least its width (VGG's
# 4,096 × 4,096 fc2: a 4,096³ GEMM per solve, 0.8 s on 2 cores) are kept and updated like the long ones: their
# n × n value is no larger than their operands. Narrower square ones (ResNet's 1x1 convs) are cheap to rebuild.
KEEP_WIDE_MIN = 2048
# Teacher pairs with fewer elements than this are matched in milliseconds: not worth a disk cache file.
DISK_CACHE_MIN_NUMEL = 1_000_000
# Groups at least this wide (n * n entries) return freed heap memory before their assignment (see allocator).
TRIM_MIN_NUMEL = 2**20
# Lazy teachers' tensors are re-read for each contribution; once this many bytes of reads and their layouts
# have been freed, they go back to the OS (see allocator). Building one cost re-reads up to 24 of ViT-B/32's
# 9 MiB MLP weights, and glibc kept the freed buffers: cold peaks varied from 1.04× to 1.53× the budget
# run to run (`examples/large_generation.py`). Every contribution: ResNet-50 K = 8 took 10 s longer.
TRIM_REREAD_BYTES = 64 * 2**20


def _view(tensor: torch.Tensor, reshape: tuple[int, ...] | None) -> torch.Tensor:
    return tensor.reshape(reshape) if reshape is not None else tensor


def permute_tensor(
    name: str,
    tensor: torch.Tensor,
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    skip_group: str | None = None,
) -> torch.Tensor:
    """`tensor` with every axis that belongs to a permuted group reordered (except `skip_group`'s)."""
    if name not in spec or not perms:
        return tensor
    groups, reshape = spec[name]
    out = _view(tensor, reshape)
    for axis, group in enumerate(groups):
        if group is not None and group != skip_group and group in perms:
            out = out.index_select(axis, perms[group].to(out.device))
    return out.reshape(tensor.shape)


def permute_trailing(
    name: str, block: torch.Tensor, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """`block`, some rows (axis 0) of tensor `name`, with every grouped axis but the first permuted.

    Valid when the spec does not split or merge axis 0 (see `rows_are_channels`)."""
    if name not in spec or not perms:
        return block
    groups, reshape = spec[name]
    out = _view(block, (block.shape[0], *reshape[1:]) if reshape is not None else None)
    for axis, group in enumerate(groups[1:], start=1):
        if group is not None and group in perms:
            out = out.index_select(axis, perms[group].to(out.device))
    return out.reshape(block.shape)


def rows_are_channels(name: str, spec: PermutationSpec, rows: int) -> bool:
    """Whether the spec keeps axis 0 of tensor `name` (of `rows` rows) whole, so rows can be permuted apart."""
    reshape = spec[name][1] if name in spec else None
    return reshape is None or reshape[0] == rows


class _Pair:
    """One spec tensor of both teachers, in the layouts its matmuls want, kept or re-read on demand.

    Two grouped axes (i, j), `rest` the others. Every permuted operand is gathered by rows (contiguous):
    - position 0, the cost of group i: `A (n_i, n_j·rest) @ O[perm_j] (n_j·rest, n_i)`, with A laid out
      `(n_i, n_j, rest)` and O `(n_j, rest, n_i)`;
    - position 1, the cost of group j: `A₁ᵀ @ O[perm_i]₁`, both laid out `(n_i, rest, n_j)` and seen as
      `(n_i·rest, n_j)`.
    """

    def __init__(self, name, groups, reshape, axes, anchor, other, keep: bool):
        self.name, self.groups, self.reshape, self.axes = name, groups, reshape, axes
        self._sources = (anchor, other)
        self._kept = {position: self._load(position) for position in (0, 1)} if keep else None

    def _prepare(self, tensor: torch.Tensor, order: str) -> torch.Tensor:
        tensor = _view(tensor.detach().to(device="cpu", dtype=torch.float32), self.reshape)
        i, j = self.axes
        rest = [a for a in range(tensor.ndim) if a not in (i, j)]
        n_i, n_j = tensor.shape[i], tensor.shape[j]
        if order == "i,j,rest":
            return tensor.permute(i, j, *rest).reshape(n_i, n_j, -1)
        if order == "j,rest,i":
            return tensor.permute(j, *rest, i).reshape(n_j, -1, n_i)
        return tensor.permute(i, *rest, j).reshape(n_i, -1, n_j)  # "i,rest,j"

    def _load(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        anchor, other = (src[self.name] for src in self._sources)
        if position == 0:
            return self._prepare(anchor, "i,j,rest"), self._prepare(other, "j,rest,i")
        return self._prepare(anchor, "i,rest,j"), self._prepare(other, "i,rest,j")

    def tensors(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._kept[position] if self._kept is not None else self._load(position)


def _spec_groups(spec: PermutationSpec, anchor: Mapping) -> tuple[dict[str, int], dict[str, list[tuple[str, int]]]]:
    shape_of = getattr(anchor, "shape", None)
    sizes: dict[str, int] = {}
    axes_of: dict[str, list[tuple[str, int]]] = {}
    for name, (groups, reshape) in spec.items():
        if reshape is not None:
            shape = reshape
        else:
            shape = tuple(shape_of(name)) if callable(shape_of) else tuple(anchor[name].shape)
        for axis, group in enumerate(groups):
            if group is not None:
                axes_of.setdefault(group, []).append((name, axis))
                sizes[group] = shape[axis]
    return sizes, axes_of


def weight_matching(
    spec: PermutationSpec,
    anchor: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    max_iter: int = 30,
    seed: int = 0,
    tol: float = 1e-3,
    stats: dict | None = None,
    workers: int | None = None,
) -> dict[str, torch.Tensor]:
    """Permutations (group → index tensor) such that `other` permuted by them matches `anchor` best.

    `perm[g][i]` is the channel of `other` that plays the role of the anchor's channel `i`.
    Coordinate ascent over the groups, at most `max_iter` rounds, until a round improves no group's
    assignment or two rounds in a row raise the matching objective (the sum over groups of the assigned
    costs) by less than the fraction `tol` each. With `tol > 0` rounds sweep the groups in forward order,
    then backward; `tol=0` is `ALGORITHM_VERSION` 1 exactly (seeded random order, stop only when nothing
    improves). `stats`, if given, receives the number of rounds, solves and linear assignments, and which
    contributions were kept and updated.

    Consecutive groups of a round that share no tensor (a ViT's MLP hidden groups) can have their linear
    assignments solved in `workers` threads at once (default `alignment_workers()`) while the next group's
    cost is built; the answer is the same as one thread's.
    """
    workers = alignment_workers() if workers is None else max(1, int(workers))
    # float32 on the CPU whatever the caller's autocast (training may run under bf16 autocast)
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        return _weight_matching(spec, anchor, other, max_iter, seed, tol, stats, workers)


def alignment_workers() -> int:
    """Threads for weight matching's linear assignments: `WEIGHTFORMER_HF_ALIGN_THREADS`, else torch's
    intra-op threads, at most 4.

    An assignment runs on one thread and releases the GIL, so those of groups that share no tensor overlap
    each other and the next cost: ViT-B/32 K = 4 took 38.2 s instead of 47.8 s on 2 cores, at the same peak
    RSS (1.24× and 1.35× the budget; examples/large_generation.py). Each pending assignment holds its cost
    matrix and scipy's float64 copy of it, hence the cap; `WEIGHTFORMER_HF_ALIGN_THREADS=1` turns it off.
    """
    value = os.environ.get("WEIGHTFORMER_HF_ALIGN_THREADS")
    if value is None:
        return max(1, min(4, torch.get_num_threads()))
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"WEIGHTFORMER_HF_ALIGN_THREADS={value!r} is not a number of threads") from None


def _independent_runs(sequence: list[str], neighbours: Mapping[str, set[str]]) -> list[list[str]]:
    """`sequence` cut into consecutive runs of groups that share no tensor with one another."""
    runs: list[list[str]] = []
    for group in sequence:
        if runs and not any(group in neighbours[h] or h in neighbours[group] for h in runs[-1]):
            runs[-1].append(group)
        else:
            runs.append([group])
    return runs


def _weight_matching(spec, anchor, other, max_iter, seed, tol, stats, workers) -> dict[str, torch.Tensor]:
    sizes, axes_of = _spec_groups(spec, anchor)
    if not axes_of:
        return {}
    keep = not (is_lazy(anchor) or is_lazy(other))
    names = sorted(axes_of)
    # constants: tensors with one grouped axis, as a dense n×n matrix or low-rank factors (n, m)
    const: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {g: ([], []) for g in names}
    pairs: dict[str, list[tuple[_Pair, int]]] = {g: [] for g in names}  # group -> (tensor, its position)
    neighbours: dict[str, set[str]] = {g: set() for g in names}
    generic: dict[str, list[str]] = {g: [] for g in names}  # tensors with > 2 grouped axes or a repeated group
    for name, (groups, reshape) in spec.items():
        axes = [a for a, g in enumerate(groups) if g is not None]
        if not axes:
            continue
        grouped = [groups[a] for a in axes]
        if len(axes) == 1:
            g, n = grouped[0], sizes[grouped[0]]
            wa, wo = (
                _view(src[name].detach().to(device="cpu", dtype=torch.float32), reshape).movedim(axes[0], 0)
                .reshape(n, -1)
                for src in (anchor, other)
            )  # fmt: skip
            if 2 * wa.shape[1] >= n:
                const[g] = torch.addmm(const[g], wa, wo.T) if g in const else wa @ wo.T
            else:
                factors[g][0].append(wa.contiguous())
                factors[g][1].append(wo.contiguous())
            del wa, wo  # else the last reads (ResNet-50's classifier: 16 MiB) live on through matching
            continue
        for g in grouped:
            neighbours[g].update(h for h in grouped if h != g)
        if len(axes) == 2 and grouped[0] != grouped[1]:
            pair = _Pair(name, groups, reshape, axes, anchor, other, keep)
            pairs[grouped[0]].append((pair, 0))
            pairs[grouped[1]].append((pair, 1))
        else:
            for g in set(grouped):
                generic[g].append(name)
            if grouped.count(grouped[0]) > 1 or len(set(grouped)) < len(grouped):
                for g in grouped:
                    neighbours[g].add(g)
    low_rank = {
        g: (torch.cat(a, dim=1), torch.cat(o, dim=1)) for g, (a, o) in factors.items() if a
    }  # fmt: skip
    del factors
    perms = {g: torch.arange(sizes[g]) for g in names}

    # Contributions whose GEMM is long (inner dimension >= 4 n: VGG's fc1, 3x3 convs) or wide and square (see
    # KEEP_WIDE_MIN) are kept and updated for the channels whose permutation changed, which costs
    # |changed| / n of a recomputation.
    kept: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (tensor, position) -> (value, perm)
    reread = 0  # bytes of tensors re-read from lazy teachers (and laid out) since freed memory last went back
    updates = 0  # kept contributions updated for some changed channels instead of rebuilt

    def contribution(pair: _Pair, position: int, n: int) -> torch.Tensor:
        nonlocal reread, updates
        g_i, g_j = (pair.groups[a] for a in pair.axes)
        perm = perms[g_j] if position == 0 else perms[g_i]
        key = (pair.name, position)
        previous = kept.get(key)
        if previous is not None:
            changed = (previous[1] != perm).nonzero().flatten()
            if len(changed) == 0:
                return previous[0]
        wa, wo = pair.tensors(position)
        if not keep:  # read from disk again: the reads and their layouts were buffers of the heap
            reread += 2 * (wa.numel() + wo.numel()) * wa.element_size()
        inner = wa.numel() // n
        if previous is not None and 2 * len(changed) < len(perm):
            value, old = previous
            new_rows = wo.index_select(0, perm[changed]) - wo.index_select(0, old[changed])
            if position == 0:
                value.addmm_(wa.index_select(1, changed).reshape(n, -1), new_rows.reshape(-1, n))
            else:
                value.addmm_(wa.index_select(0, changed).reshape(-1, n).T, new_rows.reshape(-1, n))
            kept[key] = (value, perm.clone())
            updates += 1
            return value
        if position == 0:
            value = wa.reshape(n, -1) @ wo.index_select(0, perm).reshape(-1, n)
        else:
            value = wa.reshape(-1, n).T @ wo.index_select(0, perm).reshape(-1, n)
        if inner >= 4 * n or (n >= KEEP_WIDE_MIN and inner >= n):
            kept[key] = (value, perm.clone())
        return value

    def cost_of(group: str) -> torch.Tensor:
        nonlocal reread
        n = sizes[group]
        cost = const[group].clone() if group in const else torch.zeros(n, n)
        if group in low_rank:
            cost.addmm_(*(low_rank[group][0], low_rank[group][1].T))
        for pair, position in pairs[group]:
            cost += contribution(pair, position, n)
            if reread >= TRIM_REREAD_BYTES:  # see TRIM_REREAD_BYTES
                release_free_memory()
                reread = 0
        for name in generic[group]:
            groups, reshape = spec[name]
            wa = _view(anchor[name].detach().to(device="cpu", dtype=torch.float32), reshape)
            wo = _view(other[name].detach().to(device="cpu", dtype=torch.float32), reshape)
            for axis, g in enumerate(groups):
                if g != group:
                    continue
                w_other = wo
                for other_axis, other_group in enumerate(groups):
                    if other_axis != axis and other_group is not None:
                        w_other = w_other.index_select(other_axis, perms[other_group])
                cost.addmm_(wa.movedim(axis, 0).reshape(n, -1), w_other.movedim(axis, 0).reshape(n, -1).T)
        return cost

    version = dict.fromkeys(names, 0)
    solved_at: dict[str, tuple[int, ...] | None] = dict.fromkeys(names)
    value: dict[str, float] = dict.fromkeys(names, 0.0)  # each group's assigned cost at its last solve
    order = {g: sorted(neighbours[g]) for g in names}

    def values(group: str, cost: torch.Tensor) -> tuple[float, float]:
        """The current permutation's value under `cost`, and the least gain that counts as an improvement."""
        current = float(cost[torch.arange(sizes[group]), perms[group]].sum())
        return current, 1e-9 * float(cost.abs().sum())

    def assign(group: str, negated: np.ndarray, old_value: float, least: float) -> tuple:
        """The best assignment of `group` for the cost whose float64 negation is `negated`: (perm, its value,
        `old_value`, `least`, False). scipy gets the very minimisation it builds for `maximize=True` (the same
        float64 numbers), so it copies nothing, and the float32 cost is already freed: a 3,072-wide group holds
        72 MiB while it waits and runs, not 36 + 2 × 72."""
        _, cols = linear_sum_assignment(negated)
        # the assigned float32 costs, summed as torch sums them: the value of ALGORITHM_VERSION 3, bit for bit
        new_value = float(torch.from_numpy(-negated[np.arange(len(cols)), cols]).to(torch.float32).sum())
        return torch.as_tensor(cols, dtype=torch.long), new_value, old_value, least, False

    def solve_run(due: list[str]) -> list[tuple]:
        """`assign` for each group of `due` (groups sharing no tensor). Costs are built one at a time here
        (their matmuls use every core already); the assignments, single-threaded and free of the GIL, run
        in the pool while the next cost is built, at most `workers` of them pending."""
        answers: list = []
        for group in due:
            n = sizes[group]
            pending = [a for a in answers if isinstance(a, Future) and not a.done()]
            if len(pending) >= workers:  # bounded memory: each pending assignment holds its cost (float64)
                wait(pending, return_when=FIRST_COMPLETED)
            cost = cost_of(group)
            old_value, least = values(group, cost)
            best = cost.argmax(dim=1)
            if len(torch.unique(best)) == n:  # every row gets its best column: optimal, no assignment to solve
                new_value = float(cost[torch.arange(n), best].sum())
                answers.append((best, new_value, old_value, least, True))
                continue
            if n * n >= TRIM_MIN_NUMEL:  # wide groups: earlier solves' freed buffers go back
                release_free_memory()
            negated = cost.to(torch.float64).neg_().numpy()  # torch converts on every core; numpy on one
            del cost
            if pool is not None and len(due) > 1:
                answers.append(pool.submit(assign, group, negated, old_value, least))
            else:
                answers.append(assign(group, negated, old_value, least))
            del negated
        return [a.result() if isinstance(a, Future) else a for a in answers]

    rng = np.random.default_rng(seed)
    forward = list(dict.fromkeys(g for groups, _ in spec.values() for g in groups if g is not None))
    # sweeps in forward, then backward order carry the matched input and classifier inwards (cut into runs once)
    sweeps = [_independent_runs(forward, neighbours), _independent_runs(forward[::-1], neighbours)]
    parallel = tol <= 0 or any(len(run) > 1 for run in sweeps[0])  # else no run has two groups to overlap
    pool = ThreadPoolExecutor(workers) if workers > 1 and parallel else None
    rounds = []
    try:
        for _ in range(max_iter):
            improved = False
            gain, solves, shortcuts = 0.0, 0, 0
            if tol > 0:
                runs = sweeps[len(rounds) % 2]
            else:  # the order of ALGORITHM_VERSION 1
                runs = _independent_runs([names[gi] for gi in rng.permutation(len(names))], neighbours)
            for batch in runs:
                # groups of a run share no tensor, so none of their costs depends on another's assignment:
                # solving them at once gives what solving them one after another gives
                due = [g for g in batch if solved_at[g] != tuple(version[h] for h in order[g])]
                answers = solve_run(due)
                for group, (new, new_value, old_value, least, shortcut) in zip(due, answers):
                    if new_value > old_value + least:
                        improved = True
                    gain += new_value - old_value
                    value[group] = new_value
                    solves += 1
                    shortcuts += shortcut
                    if not torch.equal(new, perms[group]):
                        version[group] += 1
                    perms[group] = new
                for group in due:
                    solved_at[group] = tuple(version[h] for h in order[group])
            scale = sum(abs(v) for v in value.values())
            relative = gain / scale if scale else 0.0
            rounds.append({"solves": solves, "argmax_shortcuts": shortcuts, "relative_gain": relative})
            if not improved or (len(rounds) >= 2 and max(r["relative_gain"] for r in rounds[-2:]) < tol):
                break
    finally:
        if pool is not None:
            pool.shutdown()
    if stats is not None:
        stats.update(
            rounds=len(rounds),
            solves=sum(r["solves"] for r in rounds),
            linear_assignments=sum(r["solves"] - r["argmax_shortcuts"] for r in rounds),
            history=rounds,
            kept_contributions=sorted(kept),  # (tensor, position): kept, to be updated rather than rebuilt
            kept_updates=updates,
        )
    return perms


# ------------------------------------------------------------------------------------------ caching
def _tensor_digest(state: Mapping[str, torch.Tensor], names) -> str:
    """Hash of the bytes, dtypes and shapes of `names` in `state` (the identity of in-memory teachers)."""
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(names):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "tensors:" + digest.hexdigest()


def content_identity(teachers, index: int, names) -> str:
    """A content key of teacher `index`: `repo@sha` or a content hash; in-memory teachers are hashed
    (once per teacher set, kept in `info.extra["tensor_digest"]`)."""
    info = teachers.infos[index]
    if info.source != "memory" and (info.revision or info.content_hash):
        return info.identity
    if "tensor_digest" not in info.extra:
        info.extra["tensor_digest"] = _tensor_digest(teachers.state_dicts[index], names)
    return info.extra["tensor_digest"]


def alignment_cache_dir() -> Path:
    from .cache_dirs import cache_root

    return cache_root() / "alignments"


def _cache_key(
    spec: PermutationSpec, teachers, anchor_key: str, other_key: str, max_iter: int, seed: int, tol: float
) -> str:
    payload = {
        "algorithm_version": ALGORITHM_VERSION,
        "family": teachers.family.name,
        "arch": teachers.arch,
        "spec": {k: [list(g), list(r) if r is not None else None] for k, (g, r) in sorted(spec.items())},
        "max_iter": max_iter,
        "seed": seed,
        "tol": tol,
        "anchor": anchor_key,
        "other": other_key,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _read_cached(path: Path, sizes: dict[str, int]) -> dict[str, torch.Tensor] | None:
    """The permutations stored at `path`, or None if it is missing, unreadable or not a valid answer."""
    if not path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        # copies: load_file's tensors may be backed by the file's memory map, which a rewrite invalidates
        perms = {group: perm.clone() for group, perm in load_file(str(path)).items()}
    except Exception:  # a corrupt or truncated file: recompute
        return None
    if set(perms) != set(sizes):
        return None
    for group, perm in perms.items():
        if perm.dtype != torch.int64 or perm.shape != (sizes[group],):
            return None
        if not torch.equal(torch.sort(perm).values, torch.arange(sizes[group])):
            return None
    return perms


def _write_cached(path: Path, perms: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file({g: p.contiguous() for g, p in perms.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:  # a read-only or full cache: matching still worked
        warnings.warn(f"could not write the alignment cache {path} ({err})", stacklevel=3)


def align_to_anchor(
    teachers,
    anchor: int,
    index: int,
    spec: PermutationSpec,
    max_iter: int = 30,
    seed: int = 0,
    tol: float = 1e-3,
    workers: int | None = None,
) -> dict[str, torch.Tensor]:
    """Permutations aligning teacher `index` of `teachers` to teacher `anchor` (`weight_matching`),
    from the set's in-memory cache, else the disk cache, else computed (and stored in both)."""
    memory = teachers.alignment_cache
    key = (teachers.infos[anchor].identity, teachers.infos[index].identity, max_iter, seed, tol)
    if key in memory:
        return memory[key]
    anchor_sd, other_sd = teachers.state_dicts[anchor], teachers.state_dicts[index]
    sizes, _ = _spec_groups(spec, anchor_sd)
    numel = sum(int(np.prod(s)) for s in teachers.shapes.values()) if hasattr(teachers, "shapes") else 0
    path = None
    if sizes and numel >= DISK_CACHE_MIN_NUMEL:
        names = [n for n in teachers.shapes if n in spec]
        anchor_key = content_identity(teachers, anchor, names)
        other_key = content_identity(teachers, index, names)
        digest = _cache_key(spec, teachers, anchor_key, other_key, max_iter, seed, tol)
        path = alignment_cache_dir() / f"{digest}.safetensors"
        cached = _read_cached(path, sizes)
        if cached is not None:
            memory[key] = cached
            return cached
    perms = weight_matching(spec, anchor_sd, other_sd, max_iter=max_iter, seed=seed, tol=tol, workers=workers)
    if path is not None:
        _write_cached(
            path,
            perms,
            {
                "algorithm_version": str(ALGORITHM_VERSION),
                "anchor": anchor_key,
                "other": other_key,
                "max_iter": str(max_iter),
                "tol": str(tol),
            },
        )
    memory[key] = perms
    return perms


def align_all_to_anchor(
    teachers, anchor: int, spec: PermutationSpec, max_iter: int = 30, workers: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Per teacher, `align_to_anchor`'s permutations (empty for the anchor itself).

    Pairs are computed one after another, each with `workers` threads for its linear assignments (default
    `alignment_workers()`). Pairs side by side in threads were measured and dropped (examples/
    large_generation.py, 2 threads): VGG-11 K = 4 122 s against 127 s, but every pair's re-read tensors and
    cost matrices were held at once, peak RSS 1.71× the budget against 1.02× (ResNet-50 K = 8: 2.56× against
    1.64×).
    """
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(len(teachers))]
    cached = len(teachers.alignment_cache)
    for k in range(len(teachers)):
        if k != anchor:
            out[k] = align_to_anchor(teachers, anchor, k, spec, max_iter=max_iter, workers=workers)
    # the solver threads' malloc arenas keep their freed cost matrices otherwise. Not when every pair came
    # from memory, as in most training episodes: there is nothing to hand back, and the trim cost 6 ms a step.
    if len(teachers.alignment_cache) != cached:
        release_free_memory()
    return out
