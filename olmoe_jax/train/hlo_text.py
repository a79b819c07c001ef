"""An optimized HLO module's text, parsed enough to count what it runs: computations of
instructions (name, shape, opcode, operands, attributes), array bytes, and how often each
computation executes per run of the entry.

A while loop's body runs its trip count: `known_trip_count` from the backend config where the
compiler states it (XLA:CPU), else read from the loop condition `i < N` (ROOT compare LT
against a constant, the counter starting from the constant in the loop's init tuple; jax's
scan and fori_loop lower to this on TPU). A loop matching neither counts once and is
reported as unknown. Both branches of a conditional are counted (an upper bound).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16|f8e\w+?)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    args: str  # the text inside the operand parentheses (a constant's literal)
    attrs: str
    root: bool


@dataclasses.dataclass
class Computation:
    name: str
    instrs: dict[str, Instr]
    root: str = ""


def _match(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    """Index of the bracket closing the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = m.group(3)
    if rest.startswith("("):
        end = _match(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren]
    end = _match(rest, paren)
    args = rest[paren + 1:end]
    operands = re.findall(r"%([\w.\-]+)", args)
    return Instr(m.group(2), shape, opcode, operands, args, rest[end + 1:], bool(m.group(1)))


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """({computation name: Computation}, entry name) of an HLO module's text.

    An instruction may span lines (a Pallas kernel's backend config can hold newlines, e.g.
    splash attention's kernel_metadata): a line that starts no instruction continues the one
    before it; only a line that is exactly "}" closes the computation. A computation whose
    ROOT was never read is incomplete (`root` stays ""): see `incomplete`."""
    comps: dict[str, Computation] = {}
    entry = ""
    current: Computation | None = None
    pending: list[str] = []

    def flush():
        ins = _parse_instr(" ".join(pending)) if pending else None
        pending.clear()
        if ins is not None:
            current.instrs[ins.name] = ins
            if ins.root:
                current.root = ins.name

    for line in text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h:
                current = Computation(h.group(2), {})
                comps[current.name] = current
                if h.group(1):
                    entry = current.name
            continue
        if line.rstrip() == "}":
            flush()
            current = None
        elif _INSTR.match(line):
            flush()
            pending.append(line)
        elif pending:
            pending.append(line)
    return comps, entry


def incomplete(comps: dict[str, Computation]) -> list[str]:
    """Computations read without their ROOT instruction: part of them was not understood, so
    anything counted from them is short."""
    return sorted(name for name, c in comps.items() if not c.root)


_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def source_lines(text: str) -> dict[int, str]:
    """{stack_frame_id: "file.py:line function"}: where in the Python source each op was
    traced (the innermost frame of the module's StackFrames table; jax writes it)."""
    tables: dict[str, dict[int, str]] = {t: {} for t in _TABLES}
    section = None
    for line in text.splitlines():
        if line.strip() in _TABLES:
            section = line.strip()
            continue
        m = re.match(r"^(\d+) (.*)$", line) if section else None
        if not m:
            section = None
            continue
        tables[section][int(m.group(1))] = m.group(2)
    names = {i: v.strip('"').rsplit("/", 1)[-1] for i, v in tables["FileNames"].items()}
    funcs = {i: v.strip('"') for i, v in tables["FunctionNames"].items()}
    where = {}
    for i, loc in tables["FileLocations"].items():
        f = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", loc)
        if f:
            where[i] = f"{names.get(int(f.group(1)), '?')}:{f.group(3)} {funcs.get(int(f.group(2)), '?')}"
    out = {}
    for i, frame in tables["StackFrames"].items():
        f = re.search(r"file_location_id=(\d+)", frame)
        if f and int(f.group(1)) in where:
            out[i] = where[int(f.group(1))]
    return out


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape (a tuple: the sum of its arrays); layouts are ignored."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _BYTES.get(dtype, 1)
    return total


def dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m and m.group(2) else []


def called(ins: Instr) -> list[tuple[str, str]]:
    """(role, computation) pairs an instruction calls."""
    out = []
    for role in ("body", "condition", "calls", "to_apply", "true_computation", "false_computation"):
        out += [(role, c) for c in re.findall(rf"\b{role}=%([\w.\-]+)", ins.attrs)]
    for role in ("branch_computations", "called_computations"):
        for group in re.findall(rf"\b{role}=\{{([^}}]*)\}}", ins.attrs):
            out += [(role, c) for c in re.findall(r"%([\w.\-]+)", group)]
    return out


def trip_count(ins: Instr, comp: Computation, comps: dict[str, Computation]) -> int | None:
    """Iterations of a while loop, or None when neither the backend config nor an `i < N`
    condition states it."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    if known:
        return int(known.group(1))
    cond_name = dict(called(ins)).get("condition")
    cond = comps.get(cond_name) if cond_name else None
    if cond is None or not cond.root:
        return None
    root = cond.instrs[cond.root]
    if root.opcode != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
        return None
    counter, limit = (cond.instrs.get(n) for n in root.operands)
    if counter is None or limit is None or limit.opcode != "constant" or counter.opcode != "get-tuple-element":
        return None
    n = _constant_value(limit)
    index = re.search(r"index=(\d+)", counter.attrs)
    if n is None or index is None:
        return None
    start = 0
    init = comp.instrs.get(ins.operands[0]) if ins.operands else None
    if init is not None and init.opcode == "tuple" and int(index.group(1)) < len(init.operands):
        first = comp.instrs.get(init.operands[int(index.group(1))])
        if first is not None and first.opcode == "constant":
            start = _constant_value(first) or 0
    return max(n - start, 0)


def _constant_value(ins: Instr) -> int | None:
    m = re.fullmatch(r"\s*(-?\d+)\s*", ins.args)
    return int(m.group(1)) if m else None


def execution_counts(comps: dict[str, Computation], entry: str) -> tuple[dict[str, float], list[str]]:
    """({computation: executions per run of the entry}, loops whose trip count is unknown)."""
    counts: dict[str, float] = defaultdict(float)
    unknown: list[str] = []
    counts[entry] = 1.0
    # Callers precede callees in a topological order: visit from the entry, accumulating.
    order = _topological(comps, entry)
    for name in order:
        comp = comps[name]
        w = counts[name]
        for ins in comp.instrs.values():
            for role, callee in called(ins):
                if callee not in comps:
                    continue
                times = 1
                if ins.opcode == "while" and role in ("body", "condition"):
                    n = trip_count(ins, comp, comps)
                    if n is None:
                        unknown.append(ins.name)
                        n = 1
                    times = n + (role == "condition")
                counts[callee] += w * times
    return dict(counts), sorted(set(unknown))


def _topological(comps, entry) -> list[str]:
    seen = {entry}
    post: list[str] = []
    stack = [(entry, iter([c for ins in comps[entry].instrs.values() for _, c in called(ins)]))]
    while stack:
        name, it = stack[-1]
        nxt = next((c for c in it if c in comps and c not in seen), None)
        if nxt is None:
            post.append(name)
            stack.pop()
            continue
        seen.add(nxt)
        stack.append((nxt, iter([c for ins in comps[nxt].instrs.values() for _, c in called(ins)])))
    return post[::-1]
