"""What a compiled (TPU) program does per step, read from its optimized HLO text.

`compiled.cost_analysis()` counts the body of a while loop once (measured: a 16-step scan of
matmuls reports 3 matmuls' FLOPs, not 48), and its `optimal_seconds` is meaningless as soon
as the program holds a Pallas/Mosaic custom call (-4.0 s for XLA's own ragged-dot kernels).
So this module walks the HLO itself:

- Execution counts: every computation is weighed by how often it runs per step (loop trip
  counts; hlo_text.py); loops of unknown trip count count once and are listed in
  `unknown_trip_counts`.
- Collectives (all-reduce, all-gather, reduce-scatter, all-to-all, ragged-all-to-all,
  collective-permute; sync or async `-start`): count and bytes per chip, times executions.
  `bytes` is the per-chip operand (the buffer each chip sends in); `wire_bytes` what a ring
  algorithm sends per chip over n devices: all-gather (n-1) x shard, reduce-scatter and
  all-to-all (n-1)/n x buffer, all-reduce 2 (n-1)/n x buffer, collective-permute the buffer;
  ragged-all-to-all is counted at its (worst-case) buffer size.
- Pallas/Mosaic kernels (`tpu_custom_call`): FLOPs and bytes from the kernel's CostEstimate
  in the backend config (`pl.CostEstimate`; XLA's own ragged-dot kernels carry one too);
  jax's splash attention kernels have none, so their matmuls are counted from their shapes
  (`_splash_flops`); any other kernel without one counts only its operand + result bytes
  and is tallied in `pallas_without_cost`.
- Hotspots: the roofline seconds of XLA ops and kernels summed by the source line that traced
  them (the module's stack-frame tables; else the op name), largest first: what the step
  time is made of.
- A computation whose text was not fully understood (no ROOT read) is listed in
  `incomplete`: what it runs is missing from the totals.
- XLA ops: for each instruction of a non-fused computation, FLOPs of the dots and
  convolutions in it (2 x output elements x contraction; a batched matmul that TPU XLA
  writes as a base-dilated convolution counts its window / lhs_dilate) and the HBM bytes it
  reads and writes (operands + results; a fused dynamic-slice reads only its slice, an
  in-place dynamic-update-slice writes only its update).
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict

from olmoe_jax.train.hlo_text import (Computation, Instr, called, dims, execution_counts, incomplete,
                                      parse_module, shape_bytes, source_lines, trip_count)

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
# Instructions that move no data through HBM themselves (or whose work is counted elsewhere:
# loop and call bodies, async -done halves).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
         "copy-done", "async-start", "async-update", "async-done", "send-done", "recv-done"}


def _group_size(ins: Instr, num_devices: int) -> int:
    """Devices in each replica group of a collective."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", ins.attrs)
    if mesh:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=", ins.attrs)
    if iota:
        return int(iota.group(1).split(",")[-1])
    explicit = re.search(r"replica_groups=\{\{([^}]*)\}", ins.attrs)
    if explicit:
        return len([v for v in explicit.group(1).split(",") if v.strip()])
    return num_devices


def _wire_factor(kind: str, n: int) -> float:
    if n <= 1:
        return 0.0 if kind != "collective-permute" else 1.0
    return {"all-gather": n - 1.0, "all-reduce": 2.0 * (n - 1) / n}.get(
        kind, 1.0 if kind == "collective-permute" else (n - 1) / n)


def _dot_flops(ins: Instr, comp: Computation) -> float:
    out = math.prod(dims(ins.shape))
    lhs = comp.instrs.get(ins.operands[0]) if ins.operands else None
    rhs = comp.instrs.get(ins.operands[1]) if len(ins.operands) > 1 else None
    if ins.opcode == "dot":
        lhs_dims = dims(lhs.shape) if lhs else []
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        k = math.prod(lhs_dims[int(d)] for d in contracting.group(1).split(",") if d) if contracting and lhs_dims else 1
        return 2.0 * out * k
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    lhs_dims, rhs_dims, out_dims = (dims(x.shape) if x else [] for x in (lhs, rhs, ins))
    if not labels or len(labels.group(2)) != len(rhs_dims) or len(labels.group(1)) != len(lhs_dims):
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    k = rhs_dims[rhs_l.index("i")]
    spatial = sorted(c for c in out_l if c.isdigit())
    window = re.search(r"window=\{([^}]*)\}", ins.attrs)
    win = window.group(1) if window else ""

    def field(key, default, n):
        m = re.search(rf"\b{key}=([\dx_\-]+)", win)
        return m.group(1).split("x") if m else [default] * n

    n = len(spatial)
    size, stride, dil, rdil = (field(key, "1", n) for key in ("size", "stride", "lhs_dilate", "rhs_dilate"))
    pad = field("pad", "0_0", n)
    macs = out / max(math.prod(out_dims[out_l.index(c)] for c in spatial), 1) * k
    for a, c in enumerate(spatial):
        # Window taps that land on a real input element (not padding, not a dilation hole).
        n_in, n_out = lhs_dims[lhs_l.index(c)], out_dims[out_l.index(c)]
        s, st, d, r = int(size[a]), int(stride[a]), int(dil[a]), int(rdil[a])
        lo = int(pad[a].split("_")[0])
        macs *= sum(1 for o in range(n_out) for j in range(s)
                    if 0 <= o * st + j * r - lo <= (n_in - 1) * d and (o * st + j * r - lo) % d == 0)
    return 2.0 * macs


def _fused_flops(name: str, comps: dict[str, Computation], memo: dict[str, float]) -> float:
    if name not in memo:
        memo[name] = 0.0
        comp = comps[name]
        total = 0.0
        for ins in comp.instrs.values():
            if ins.opcode in ("dot", "convolution"):
                total += _dot_flops(ins, comp)
            elif ins.opcode == "fusion":
                total += sum(_fused_flops(c, comps, memo) for _, c in called(ins) if c in comps)
        memo[name] = total
    return memo[name]


def _users(comp: Computation) -> dict[str, list[Instr]]:
    users: dict[str, list[Instr]] = defaultdict(list)
    for f in comp.instrs.values():
        for o in f.operands:
            users[o].append(f)
    return users


def _params(comp: Computation) -> dict[int, str]:
    return {int(p.args): p.name for p in comp.instrs.values() if p.opcode == "parameter" and p.args.strip().isdigit()}


def _read_bytes(comp: Computation, name: str, comps: dict[str, Computation], depth: int = 0) -> float:
    """HBM bytes a fused computation reads of its value `name` (a parameter): only the slices
    where every use is a dynamic-slice (also through bitcasts and nested fusions), nothing
    where it is the buffer of an in-place dynamic-update-slice, else all of it."""
    full = shape_bytes(comp.instrs[name].shape)
    total = 0.0
    for u in _users(comp).get(name, []):
        if u.opcode == "dynamic-slice" and u.operands[0] == name:
            total += shape_bytes(u.shape)
        elif u.opcode == "dynamic-update-slice" and u.operands[0] == name:
            continue
        elif u.opcode == "bitcast" and depth < 8:
            total += _read_bytes(comp, u.name, comps, depth + 1)
        elif u.opcode == "fusion" and depth < 8:
            nested = next((comps[c] for _, c in called(u) if c in comps), None)
            params = _params(nested) if nested else {}
            for i, o in enumerate(u.operands):
                if o == name:
                    total += _read_bytes(nested, params[i], comps, depth + 1) if i in params else full
        else:
            return full
    return min(total, full)


def _fusion_bytes(ins: Instr, comp: Computation, comps: dict[str, Computation]) -> float:
    """HBM bytes a fusion reads and writes: slices of operands it only slices, no rewrite of a
    buffer it updates in place."""
    fused = next((comps[c] for _, c in called(ins) if c in comps), None)
    if fused is None:
        return _plain_bytes(ins, comp)
    params = _params(fused)
    total = 0.0
    for i, operand in enumerate(ins.operands):
        if i in params:
            total += _read_bytes(fused, params[i], comps)
        elif operand in comp.instrs:
            total += shape_bytes(comp.instrs[operand].shape)
    out = shape_bytes(ins.shape)
    root = fused.instrs.get(fused.root)
    roots = [fused.instrs.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
    for r in roots:
        if r is not None and r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
            update = fused.instrs.get(r.operands[1])
            out -= shape_bytes(r.shape) - (shape_bytes(update.shape) if update else 0.0)
    return total + max(out, 0.0)


def _plain_bytes(ins: Instr, comp: Computation) -> float:
    if ins.opcode == "dynamic-slice":
        return 2 * shape_bytes(ins.shape)
    if ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:
        update = comp.instrs.get(ins.operands[1])
        return 2 * (shape_bytes(update.shape) if update else 0.0)
    if ins.opcode == "copy-start":  # reads and writes its source (its result tuple repeats it)
        src = comp.instrs.get(ins.operands[0]) if ins.operands else None
        return 2 * shape_bytes(src.shape) if src else 0.0
    operands = sum(shape_bytes(comp.instrs[o].shape) for o in ins.operands if o in comp.instrs)
    return operands + shape_bytes(ins.shape)


# jax's splash attention kernels carry no CostEstimate (jax 0.10): their FLOPs are their
# matmuls over the computed (causal) blocks. fwd: QK^T, PV; dq: QK^T, dO V^T, dS K; dkv: QK^T,
# P^T dO, dO V^T, dS^T Q.
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def _splash_flops(ins: Instr) -> float | None:
    """FLOPs of a splash attention call, from its operand shapes: q [B, H, T, hd] (the first
    4-d bf16/f32 operand) and the block mask [.., n, n]: n(n+1)/2 of n^2 blocks computed."""
    kind = re.search(r"splash_mha_(fwd|dq|dkv)", ins.name + " " + ins.attrs)
    ops = re.search(r"operand_layout_constraints=\{(.*?)\}, \w+=", ins.attrs)
    if not kind or not ops:
        return None
    arrays = re.findall(r"\b(s8|bf16|f32)\[([\d,]+)\]", ops.group(1))
    mask = next((d for t, d in arrays if t == "s8" and d.count(",") == 2), None)
    q = next((d for t, d in arrays if t != "s8" and d.count(",") == 3), None)
    if not mask or not q:
        return None
    n = int(mask.split(",")[1])
    B, H, T, hd = (int(x) for x in q.split(","))
    return _SPLASH_MATMULS[kind.group(1)] * 2.0 * B * H * T * T * hd * (n + 1) / (2 * n)


def _pallas_cost(ins: Instr, comp: Computation) -> tuple[float, float, bool]:
    """(flops, bytes, has a cost) of one Mosaic kernel call: its CostEstimate, or for splash
    attention its matmuls (_splash_flops) with its operand + result bytes."""
    m = re.search(r'"cost_estimate":(\{[^}]*\})', ins.attrs)
    if m:
        est = json.loads(m.group(1))
        return float(est.get("flops", 0)), float(est.get("bytes_accessed", 0)), True
    splash = _splash_flops(ins)
    return (splash or 0.0), _plain_bytes(ins, comp), splash is not None


def _top_level(comps: dict[str, Computation], entry: str) -> set[str]:
    """Computations whose instructions run as their own kernels: the entry, loop bodies and
    conditions, called computations, conditional branches, async wrappers (not fusion bodies
    or reducers)."""
    top = {entry}
    for comp in comps.values():
        for ins in comp.instrs.values():
            for role, callee in called(ins):
                if (ins.opcode, role) in (("while", "body"), ("while", "condition"), ("call", "to_apply")) \
                        or ins.opcode == "conditional" or (ins.opcode == "async-start" and role == "calls"):
                    top.add(callee)
    return top


def _where(ins: Instr, lines: dict[int, str]) -> str:
    """The source line that traced `ins` ("file.py:line function"), else its op name."""
    frame = re.search(r"stack_frame_id=(\d+)", ins.attrs)
    if frame and int(frame.group(1)) in lines:
        return lines[int(frame.group(1))]
    op = re.search(r'op_name="([^"]*)"', ins.attrs)
    return op.group(1).rsplit("/", 1)[-1] if op else ins.opcode


def analyze(text: str, *, num_devices: int, peak_flops: float, hbm_bytes_per_s: float,
            hotspots: int = 12) -> dict:
    """Per-chip, per-step totals of a compiled program's HLO text (see the module docstring).

    peak_flops, hbm_bytes_per_s: the chip's figures, for the roofline time of each op
    (max of its FLOPs / peak and its bytes / HBM bandwidth), summed over executions.
    Returns {collectives: {kind: {count, bytes, wire_bytes}}, pallas: {calls, flops, bytes,
    seconds, without_cost}, xla: {flops, bytes, seconds}, loops: {name: trip count},
    unknown_trip_counts: [while names], incomplete: [computations not fully read],
    hotspots: [{where, seconds, flops, bytes}] (the `hotspots` largest)}.
    """
    comps, entry = parse_module(text)
    counts, unknown = execution_counts(comps, entry)
    unread = [name for name in incomplete(comps) if counts.get(name)]
    top = _top_level(comps, entry)
    memo: dict[str, float] = {}
    coll = {k: {"count": 0.0, "bytes": 0.0, "wire_bytes": 0.0} for k in COLLECTIVES}
    pallas = {"calls": 0.0, "flops": 0.0, "bytes": 0.0, "seconds": 0.0, "without_cost": 0}
    xla = {"flops": 0.0, "bytes": 0.0, "seconds": 0.0}
    loops = {}
    lines = source_lines(text)
    spots: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])

    def spot(ins, w, flops, nbytes, seconds):
        acc = spots[_where(ins, lines)]
        acc[0] += w * seconds
        acc[1] += w * flops
        acc[2] += w * nbytes

    for name, comp in comps.items():
        w = counts.get(name, 0.0)
        if not w:
            continue
        for ins in comp.instrs.values():
            kind = ins.opcode[:-len("-start")] if ins.opcode.endswith("-start") else ins.opcode
            if kind in COLLECTIVES:
                data = sum(shape_bytes(comp.instrs[o].shape) for o in ins.operands if o in comp.instrs)
                c = coll[kind]
                c["count"] += w
                c["bytes"] += w * data
                c["wire_bytes"] += w * data * _wire_factor(kind, _group_size(ins, num_devices))
                continue
            if name not in top or ins.opcode in _FREE or ins.opcode.endswith("-done"):
                if ins.opcode == "while":
                    loops[ins.name] = trip_count(ins, comp, comps)
                continue
            if ins.opcode == "custom-call":
                if 'custom_call_target="tpu_custom_call"' not in ins.attrs:
                    continue  # TPU bookkeeping (AllocateBuffer, async preparation)
                flops, nbytes, has_cost = _pallas_cost(ins, comp)
                pallas["calls"] += w
                pallas["flops"] += w * flops
                pallas["bytes"] += w * nbytes
                pallas["seconds"] += w * max(flops / peak_flops, nbytes / hbm_bytes_per_s)
                pallas["without_cost"] += 0 if has_cost else 1
                spot(ins, w, flops, nbytes, max(flops / peak_flops, nbytes / hbm_bytes_per_s))
                continue
            if ins.opcode == "fusion":
                flops = sum(_fused_flops(c, comps, memo) for _, c in called(ins) if c in comps)
                nbytes = _fusion_bytes(ins, comp, comps)
            else:
                flops = _dot_flops(ins, comp) if ins.opcode in ("dot", "convolution") else 0.0
                nbytes = _plain_bytes(ins, comp)
            xla["flops"] += w * flops
            xla["bytes"] += w * nbytes
            xla["seconds"] += w * max(flops / peak_flops, nbytes / hbm_bytes_per_s)
            spot(ins, w, flops, nbytes, max(flops / peak_flops, nbytes / hbm_bytes_per_s))
    top = sorted(spots.items(), key=lambda kv: -kv[1][0])[:hotspots]
    return {"collectives": {k: v for k, v in coll.items() if v["count"]}, "pallas": pallas, "xla": xla,
            "loops": loops, "unknown_trip_counts": unknown, "incomplete": unread,
            "hotspots": [{"where": k, "seconds": v[0], "flops": v[1], "bytes": v[2]} for k, v in top]}

