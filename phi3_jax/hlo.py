"""Reading XLA's optimized HLO text: array sizes, computations, loop trip counts, and the bytes a compiled
step moves between devices (`collective_bytes`, reported by `phi3_jax.aot`; bench/hlo_traffic.py tallies
the GPU step's kernels with the same readers)."""
from __future__ import annotations

import collections
import re

BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
         "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(BYTES) + r")\[([0-9,]*)\]")
INSTR = re.compile(r"(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)(?:, |$)")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(")
# A computation's closing line ("}" or "}, execution_thread=..."), not a line of a multi-line attribute.
_END = re.compile(r"^\}(, execution_thread=\S+)?\s*$")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast", "ragged-all-to-all")


def arrays(text: str):
    """(dtype, element count) of every array shape written in `text`."""
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        yield dtype, n


def shape_elements(text: str) -> int:
    """Elements of every array shape written in `text`."""
    return sum(n for _, n in arrays(text))


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (a tuple shape counts each element)."""
    return sum(n * BYTES[dtype] for dtype, n in arrays(text))


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and line.rstrip().endswith("{"):
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif _END.match(line):
            current = None
        elif current is not None:
            comps[current].append(line.strip())
    return comps, entry


def trip_count(while_line: str, comps: dict[str, list[str]]) -> int | None:
    """Iterations of a `while`: XLA's known_trip_count where the backend writes it (CPU, GPU), else a
    condition `counter < N` with a constant N (XLA:TPU's form of a `lax.scan`, and of the loops of its
    windowed matmuls, whose counters start at 0); None if neither reads."""
    known = re.search(r'known_trip_count":\{"n":"(\d+)"', while_line)
    if known:
        return int(known.group(1))
    cond = re.search(r"\bcondition=%([\w.\-]+)", while_line)
    lines = comps.get(cond.group(1), []) if cond else []
    constants = {m.group(1): int(m.group(2)) for m in
                 (re.match(r"%([\w.\-]+) = [su](?:32|64)\[\]\S* constant\((\d+)\)", line) for line in lines) if m}
    for line in lines:
        root = re.match(r"ROOT %[\w.\-]+ = pred\[\]\S* compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
        if root and root.group(1) in constants:
            return constants[root.group(1)]
    return None


def collective_bytes(hlo_text: str) -> tuple[dict[str, int], bool]:
    """Bytes of the arrays that each kind of collective handles on one device in one run of the entry
    computation: all-gather its result (the gathered array), reduce-scatter its operand (before the
    scatter), all-reduce, collective-permute and all-to-all their result. The ops in a loop's body count
    once per iteration; an asynchronous pair counts its `-done` result; a conditional, kind by kind, its
    largest branch. Also returns whether every loop's trip count was read (an unknown one counts once)."""
    comps, entry = computations(hlo_text)
    exact = True
    memo: dict[str, collections.Counter] = {}

    def tally(name: str) -> collections.Counter:
        nonlocal exact
        if name in memo:
            return memo[name]
        memo[name] = collections.Counter()  # a cycle (never in valid HLO) counts nothing
        out = collections.Counter()
        sizes: dict[str, int] = {}
        for line in comps.get(name, []):
            m = INSTR.match(line)
            if not m:
                continue
            shape, op = m.group(2), m.group(3)
            sizes[m.group(1)] = shape_bytes(shape)
            kind = op.removesuffix("-done")
            if kind == "reduce-scatter" and op == kind:  # its operand: the array before the scatter
                out[kind] += sum(sizes.get(a.strip().lstrip("%"), 0) for a in m.group(4).split(","))
                continue
            if kind in COLLECTIVES:
                out[kind] += shape_bytes(shape)
            if op.endswith("-done") or op == "async-update":  # an asynchronous op's start names what it runs
                continue
            fused = re.search(r"\bcalls=%(all-reduce-scatter[\w.\-]*)", line) if op == "fusion" else None
            if fused:  # XLA:TPU's reduce-scatter: an all-reduce and this device's slice, fused
                out["reduce-scatter"] += tally(fused.group(1)).get("all-reduce", 0)
                continue
            times = 1
            if op == "while":
                times = trip_count(line, comps)
                if times is None:
                    exact, times = False, 1
            callees = _CALLS.findall(line)
            for branches in _BRANCHES.findall(line):
                callees += [b.strip().lstrip("%") for b in branches.split(",") if b.strip()]
            if op == "conditional":  # one branch runs: the largest, kind by kind
                callees = [collections.Counter({k: max(tally(c)[k] for c in callees)
                                                for c in callees for k in tally(c)})]
            for callee in callees:
                for k, v in (tally(callee) if isinstance(callee, str) else callee).items():
                    out[k] += v * times
        memo[name] = out
        return out

    return dict(tally(entry)), exact
