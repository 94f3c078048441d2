"""Rolling a graph's repeated blocks into ``jax.lax.scan``, so that the traced function does not grow with depth.

A ResNet stage or a transformer's layers are exported as the same nodes over and over, each copy reading its own
parameters. Walked node by node, every copy becomes its own equations in the jaxpr and its own HLO, and XLA's
compile time grows with depth. Here the graph is cut where exactly one traced value flows from the earlier nodes to
the later ones (the *carry*); the nodes between two cuts form a *segment*; consecutive segments whose structure is
the same (same ops, attributes, wiring, constants, carry shape) are *blocks* of one *run*, executed as one
``lax.scan`` over the first block's nodes with the blocks' own parameters stacked along the scanned axis.

Anything the plan cannot prove equal to the unrolled walk stays unrolled: a plan only changes how the function is
traced, never what it computes (values and derivatives).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from torchntk._repeated_blocks import MIN_REPETITIONS

from ._core import Node, Value, is_static

Walk = Callable[[Sequence[Node], dict[str, Value]], dict[str, Value]]

_MAX_PERIOD = 4  # segments per block: a ViT layer is 2 (attention, MLP), each ending in its residual add
_OUTER_TRIES = 3  # long-lived values tried as closed-over ("outer") values, besides none
# Runs whose blocks hold a dense convolution (ONNX Conv with group 1) are rolled too. They once seemed to lose: the
# zoo's resnet152 warm call 11.3 → 38.7 s, efficientnet_v2_l 2.2 → 54.2 s; but XLA's cost analysis counts a loop's
# body once, so the fast tier took their programs for light and compiled them at LLVM O0 (bridge/compile_tiers.py's
# loop_factor now counts each iteration). At the tier so chosen (O1), resnet152's structured program: lower 3.8 →
# 1.7 s, compile 12.3 → 3.5 s, run 13.4 → 0.77 s; efficientnet_v2_l's 7.7 → 3.4, 21.6 → 7.4, 1.56 → 1.43 s.
ROLL_DENSE_CONVOLUTIONS = True
# Inputs a constant may differ in between blocks of a run (then stacked, traced): the handler computes the same
# values whether it is static or traced, and the node's output is traced anyway (nothing downstream needs it static).
_DATA_INPUTS = {"Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "Div": (0, 1), "BatchNormalization": (1, 2, 3, 4)}


@dataclass(frozen=True)
class ValueFacts:
    """What one abstract walk learned of every named value: static ones by value, traced ones by shape and dtype."""

    static: dict[str, np.ndarray]
    traced: dict[str, tuple[tuple[int, ...], np.dtype]]


@dataclass(frozen=True)
class Block:
    """One copy of a repeated block: the nodes ``[start, stop)``, which read the traced value ``carry_in`` (and
    closed-over values) and hand on ``carry_out`` alone; ``stacked``: the graph inputs only this block reads (its
    parameters), in the order the block's nodes first read them."""

    start: int
    stop: int
    carry_in: str
    carry_out: str
    stacked: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """Consecutive blocks of the same structure, ``period`` segments each, executed as one ``lax.scan``."""

    blocks: tuple[Block, ...]
    period: int

    @property
    def start(self) -> int:
        return self.blocks[0].start

    @property
    def stop(self) -> int:
        return self.blocks[-1].stop


@dataclass(frozen=True)
class RollPlan:
    """The runs of one graph at one set of input shapes, in node order (non-overlapping)."""

    runs: tuple[Run, ...]

    def summary(self) -> list[tuple[int, int, int]]:
        """``(first node index, period in segments, repetitions)`` per run."""
        return [(run.start, run.period, len(run.blocks)) for run in self.runs]


def input_key(inputs: Sequence[Any]) -> tuple:
    """The shapes and dtypes of the graph inputs: what a plan depends on besides the graph."""
    arrays = [jnp.asarray(v) if not hasattr(v, "dtype") else v for v in inputs]
    return tuple((tuple(a.shape), str(np.dtype(a.dtype))) for a in arrays)


def value_facts(walk_all: Callable[..., dict[str, Value]], inputs: Sequence[Any]) -> ValueFacts:
    """Walk the whole graph once abstractly (``jax.eval_shape``: no FLOPs) and record, per name, whether the walker
    keeps the value static (numpy: computed from constants only) and the shape/dtype of traced ones."""
    static: dict[str, np.ndarray] = {}
    traced: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def record(*args: jax.Array) -> None:
        for name, value in walk_all(*args).items():
            if value is None:
                continue
            if is_static(value):
                static[name] = np.asarray(value)
            else:  # read inside the trace: a leaked tracer's aval is not to be relied on
                traced[name] = (tuple(value.shape), np.dtype(value.dtype))

    specs = [jax.ShapeDtypeStruct(key_shape, dtype) for key_shape, dtype in input_key(inputs)]
    jax.eval_shape(record, *specs)
    return ValueFacts(static, traced)


def _array_digest(array: np.ndarray) -> str:
    """Exact identity of a static value: dtype, shape and bytes (``values_digest`` rounds through float64)."""
    array = np.ascontiguousarray(array)
    head = f"{array.dtype.str}{array.shape}".encode()
    return hashlib.sha256(head + array.tobytes()).hexdigest()[:32]


def _attrs_key(attrs: dict[str, Any]) -> tuple:
    """A node's decoded attributes as a hashable, exact key (arrays by their bytes, floats by ``repr``)."""
    return tuple(
        (key, _array_digest(value) if isinstance(value, np.ndarray) else repr(value))
        for key, value in sorted(attrs.items())
    )


@dataclass(frozen=True)
class _Segment:
    """Nodes ``[start, stop)`` between two cuts; ``signature`` is None when the segment may not be rolled."""

    start: int
    stop: int
    carry_in: str
    carry_out: str
    stacked: tuple[str, ...]
    outer: tuple[str, ...]  # traced values produced before the segment (not graph inputs) that it reads
    varying: tuple[str, ...]  # constants that may differ between blocks (stacked when they do), by slot
    signature: tuple | None


class _Planner:
    """Cuts, segments and runs of one graph at one set of input shapes (see :func:`plan_rolls`)."""

    def __init__(
        self, nodes: Sequence[Node], input_names: Sequence[str], output_names: Sequence[str], facts: ValueFacts
    ) -> None:
        self.nodes, self.facts = nodes, facts
        self.inputs = frozenset(input_names)
        self.end = len(nodes)  # a graph output counts as read at position len(nodes)
        self.producer: dict[str, int] = {}
        self.readers: dict[str, set[int]] = defaultdict(set)
        for index, node in enumerate(nodes):
            for name in node.inputs:
                if name:
                    self.readers[name].add(index)
            for name in node.outputs:
                if name:
                    self.producer[name] = index
        for name in output_names:
            self.readers[name].add(self.end)
        self._digests: dict[str, str] = {}

    def digest(self, name: str) -> str:
        if name not in self._digests:
            self._digests[name] = _array_digest(self.facts.static[name])
        return self._digests[name]

    def intermediates(self) -> list[str]:
        """Traced values produced by a node and read later: the ones whose liveness defines the cuts."""
        return [n for n, i in self.producer.items() if n in self.facts.traced and self.readers.get(n)]

    def cuts(self, outer: frozenset[str]) -> list[tuple[int, str]]:
        """``(position, carry)`` for each position (before node ``position``) where exactly one traced value, not
        in ``outer``, is produced before and read at or after it. Graph inputs and static values are always at
        hand in the walker's env, so they do not count."""
        count = np.zeros(self.end + 2, np.int64)
        ids = np.zeros(self.end + 2, np.int64)
        names = [n for n in self.intermediates() if n not in outer]
        for k, name in enumerate(names, start=1):
            first, last = self.producer[name] + 1, max(self.readers[name])
            if last >= first:  # live at positions first..last
                count[first] += 1
                count[last + 1] -= 1
                ids[first] += k
                ids[last + 1] -= k
        count, ids = np.cumsum(count), np.cumsum(ids)
        return [(i, names[ids[i] - 1]) for i in range(1, self.end + 1) if count[i] == 1]

    def _data_constants(self, start: int, stop: int) -> set[str]:
        """Float constants that the segment reads only as data of :data:`_DATA_INPUTS` whose outputs are traced;
        not a single number of a node with aten numbers, which :func:`exact_numbers` may replace."""
        eligible: set[str] = set()
        refused: set[str] = set()
        for node in self.nodes[start:stop]:
            data = _DATA_INPUTS.get(node.op_type, ())
            traced = all(o in self.facts.traced for o in node.outputs if o)
            for position, name in enumerate(node.inputs):
                if name in self.facts.static:
                    array = self.facts.static[name]
                    ok = traced and position in data and np.issubdtype(array.dtype, np.floating)
                    (eligible if ok and (array.size > 1 or not node.numbers) else refused).add(name)
        return eligible - refused

    def segment(self, start: int, stop: int, carry_in: str, carry_out: str) -> _Segment:
        """The segment's structural signature: per node its op, attributes, aten numbers and where each input comes
        from (a local node's output, the carry, a constant by value or, as data of an arithmetic op, by slot, a
        graph input only it reads by slot, or any other value by name); None where a value other than
        ``carry_out`` leaves it."""
        local: dict[str, tuple[int, int]] = {}
        stacked: dict[str, int] = {}
        varying: dict[str, int] = {}
        data_constants = self._data_constants(start, stop)
        outer: list[str] = []
        parts: list[tuple] = [self.facts.traced[carry_in], self.facts.traced[carry_out]]
        for index in range(start, stop):
            node = self.nodes[index]
            wiring = []
            for name in node.inputs:
                if not name:
                    wiring.append(("none",))
                elif name in local:
                    wiring.append(("local", *local[name]))
                elif name == carry_in:
                    wiring.append(("carry",))
                elif name in data_constants:  # compared between blocks when the run is formed
                    slot = varying.setdefault(name, len(varying))
                    array = self.facts.static[name]
                    wiring.append(("data", slot, array.shape, array.dtype))
                elif name in self.facts.static:
                    wiring.append(("const", self.digest(name)))
                elif name in self.inputs and all(start <= r < stop for r in self.readers[name]):
                    slot = stacked.setdefault(name, len(stacked))
                    wiring.append(("stacked", slot, *self.facts.traced[name]))
                else:  # a graph input others read too (a shared weight), or a value from before (a mask)
                    wiring.append(("outer", name))
                    if name not in self.inputs:
                        outer.append(name)
            for slot, name in enumerate(node.outputs):
                if name:
                    local[name] = (index - start, slot)
            key = (node.op_type, node.opset, node.aten, node.numbers, _attrs_key(node.attrs))
            parts.append((*key, tuple(bool(o) for o in node.outputs), tuple(wiring)))
        leaving = [n for n in local if any(r >= stop for r in self.readers.get(n, ())) and n != carry_out]
        rollable = carry_out in local and not leaving
        signature = tuple(parts) if rollable else None
        outer_names = tuple(dict.fromkeys(outer))
        return _Segment(start, stop, carry_in, carry_out, tuple(stacked), outer_names, tuple(varying), signature)

    def segments(self, outer: frozenset[str]) -> list[_Segment]:
        cuts = self.cuts(outer)
        return [self.segment(a, b, ca, cb) for (a, ca), (b, cb) in zip(cuts, cuts[1:], strict=False)]

    def valid(self, segments: Sequence[_Segment], period: int) -> bool:
        """Whether these consecutive segments may run as one scan of ``period``-segment blocks: every closed-over
        traced value exists before the run starts; each carry but the last is read by the next segment alone (not
        by a later node, not as a graph output); and each block's data constants can be bound by name in the scan's
        body: read as data throughout the block, and the same slots naming the same constant in every block."""
        start = segments[0].start
        if any(self.producer[n] >= start for s in segments for n in s.outer):
            return False
        for here, after in zip(segments, segments[1:], strict=False):
            if any(not after.start <= r < after.stop for r in self.readers[here.carry_out]):
                return False
        patterns = set()
        for k in range(0, len(segments), period):
            group = segments[k : k + period]
            names = [name for s in group for name in s.varying]
            if not set(names) <= self._data_constants(group[0].start, group[-1].stop):
                return False
            patterns.add(tuple(names.index(name) for name in names))
        return len(patterns) <= 1

    def runs(self, segments: Sequence[_Segment]) -> list[Run]:
        """Maximal runs of consecutive segments repeating with a period of 1 to 4 segments, at least twice, scanned
        left to right; where several periods start at a segment, the one covering the most nodes."""
        signatures = [s.signature for s in segments]
        found: list[Run] = []
        j = 0
        while j < len(segments):
            best: tuple[int, int, int] | None = None  # (nodes covered, period, repetitions)
            for period in range(1, _MAX_PERIOD + 1):
                pattern = signatures[j : j + period]
                if len(pattern) < period or any(s is None for s in pattern):
                    continue
                if pattern[0][0] != pattern[-1][1]:  # the block's carry must keep its shape and dtype
                    continue
                reps = 1
                while signatures[j + reps * period : j + (reps + 1) * period] == pattern:
                    reps += 1
                while reps >= MIN_REPETITIONS and not self.valid(segments[j : j + reps * period], period):
                    reps -= 1
                if reps >= MIN_REPETITIONS and (
                    ROLL_DENSE_CONVOLUTIONS or not self.dense_convolutions(segments[j : j + period])
                ):
                    covered = segments[j + reps * period - 1].stop - segments[j].start
                    if best is None or covered > best[0]:
                        best = (covered, period, reps)
            if best is None:
                j += 1
                continue
            _, period, reps = best
            found.append(self.run(segments[j : j + reps * period], period))
            j += reps * period
        return found

    def dense_convolutions(self, block: Sequence[_Segment]) -> bool:
        """Whether the block (its segments) holds a Conv or ConvTranspose of group 1."""
        return any(
            node.op_type in ("Conv", "ConvTranspose") and int(node.attr("group", 1)) == 1
            for node in self.nodes[block[0].start : block[-1].stop]
        )

    def run(self, segments: Sequence[_Segment], period: int) -> Run:
        """The blocks of ``period`` segments each; a data constant is stacked with the parameters where the blocks'
        values differ, else closed over as the first block's (kept static)."""
        groups = [segments[k : k + period] for k in range(0, len(segments), period)]
        constants = [[name for s in group for name in s.varying] for group in groups]
        differing = [
            slot for slot in range(len(constants[0])) if len({self.digest(names[slot]) for names in constants}) > 1
        ]
        blocks = []
        for group, names in zip(groups, constants, strict=True):
            stacked = tuple(name for s in group for name in s.stacked) + tuple(names[slot] for slot in differing)
            blocks.append(Block(group[0].start, group[-1].stop, group[0].carry_in, group[-1].carry_out, stacked))
        run = Run(tuple(blocks), period)
        # The scan binds the last carry alone: nothing else the blocks compute may be read after them.
        inside = {name for node in self.nodes[run.start : run.stop] for name in node.outputs if name}
        escaping = [n for n in inside - {blocks[-1].carry_out} if any(r >= run.stop for r in self.readers.get(n, ()))]
        assert not escaping, f"values {escaping[:3]} computed by a rolled run are read after it"
        return run


def plan_rolls(
    nodes: Sequence[Node], input_names: Sequence[str], output_names: Sequence[str], facts: ValueFacts
) -> RollPlan:
    """The runs to scan. Long-lived traced values (a stem output or mask every block reads) would leave no cut with
    a single live value, so the plan is also made with the one to three longest-lived values closed over; the plan
    rolling the most nodes wins (ties: fewer closed-over values)."""
    planner = _Planner(nodes, input_names, output_names, facts)
    span = {n: max(planner.readers[n]) - planner.producer[n] for n in planner.intermediates()}
    longest = sorted((n for n in span if span[n] > 2), key=lambda n: (-span[n], planner.producer[n]))
    best: list[Run] = []
    best_rolled = 0
    for k in range(min(_OUTER_TRIES, len(longest)) + 1):
        runs = planner.runs(planner.segments(frozenset(longest[:k])))
        rolled = sum(run.stop - run.start for run in runs)
        if rolled > best_rolled:
            best, best_rolled = runs, rolled
    return RollPlan(tuple(best))


def walk_rolled(nodes: Sequence[Node], plan: RollPlan, env: dict[str, Value], walk: Walk) -> dict[str, Value]:
    """Walk ``nodes`` into ``env`` as ``walk`` does, each run of ``plan`` as one ``lax.scan``."""
    done = 0
    for run in plan.runs:
        walk(nodes[done : run.start], env)
        env[run.blocks[-1].carry_out] = _scan(nodes, run, env, walk)
        done = run.stop
    return walk(nodes[done:], env)


def _scan(nodes: Sequence[Node], run: Run, env: dict[str, Value], walk: Walk) -> jax.Array:
    """The last block's output: the first block's nodes scanned over the blocks' stacked parameters, everything
    else they read (constants, shared weights, values from before the run) closed over from ``env``."""
    first = run.blocks[0]
    body_nodes = nodes[first.start : first.stop]
    xs = tuple(
        jnp.stack([jnp.asarray(env[block.stacked[slot]]) for block in run.blocks]) for slot in range(len(first.stacked))
    )
    # convert_element_type drops a weak type, which lax.scan would refuse as a carry type change
    init = lax.convert_element_type(env[first.carry_in], np.dtype(jnp.result_type(env[first.carry_in])))

    def body(carry: jax.Array, slices: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        local = dict(env)
        local.update(zip(first.stacked, slices, strict=True))
        local[first.carry_in] = carry
        out = walk(body_nodes, local)[first.carry_out]
        return lax.convert_element_type(out, init.dtype), None

    carry, _ = lax.scan(body, init, xs, length=len(run.blocks))
    return carry
