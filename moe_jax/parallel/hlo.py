"""Reading compiled programs: array bytes of HLO / StableHLO shapes, collectives and their bytes.

Compiled (SPMD) HLO text is the program one device runs, so every count and byte total here is
per device. Byte totals and FLOPs are per step: an instruction inside a `while` body counts once
per iteration (`loop_weights`: the product of the `known_trip_count`s of the loops around it;
XLA's own `cost_analysis()` counts every loop body once).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Sequence

import numpy as np

# ragged-all-to-all: its result is the whole receive buffer (what arrives is data-dependent).
COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "all-reduce", "reduce-scatter",
               "collective-permute")
# Bytes per element, by HLO element type name.
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# StableHLO (MLIR) integer element type names -> HLO names (float names are the same).
_MLIR_INTEGERS = {"i1": "pred", "i8": "s8", "ui8": "u8", "i16": "s16", "ui16": "u16",
                  "i32": "s32", "ui32": "u32", "i64": "s64", "ui64": "u64"}


def _array_shapes(text: str) -> list[tuple[str, int]]:
  """(element type, element count) of every array shape `f32[4,8]{...}` in `text`."""
  return [(dtype, math.prod(int(d) for d in dims.split(",") if d))
          for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text)
          if dtype in DTYPE_BYTES]


def _array_bytes(text: str) -> int:
  """Bytes of the first array shape in `text` (the data of a `send`'s result tuple)."""
  dtype, n = _array_shapes(text)[0]
  return DTYPE_BYTES[dtype] * n


def _shape_bytes(text: str) -> int:
  """Bytes of every array shape `f32[4,8]{...}` in `text` (tuple shapes summed)."""
  return sum(DTYPE_BYTES[dtype] * n for dtype, n in _array_shapes(text))


def _tensor_bytes(text: str) -> int:
  """Bytes of every StableHLO tensor type `tensor<4x8xf32>` in `text`."""
  total = 0
  for dims, dtype in re.findall(r"tensor<((?:\d+x)*)([a-z]+\d+)>", text):
    total += DTYPE_BYTES[_MLIR_INTEGERS.get(dtype, dtype)] * math.prod(
        int(d) for d in dims.split("x") if d)
  return total


def _is_no_op(line: str) -> bool:
  """A collective whose replica groups all have one member (e.g. over a mesh axis of size 1,
  which XLA:CPU leaves in the program): it moves nothing."""
  groups = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
  return bool(groups) and all("," not in g for g in re.findall(r"\{([\d,]*)\}", groups.group(1)))


# A computation header `%name (p: f32[2]) -> f32[2] {` (`ENTRY %main ...` for the entry).
_COMPUTATION_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
# Attributes naming the computations an instruction runs once per execution.
_CALLED_ONCE = re.compile(
    r"\b(?:calls|to_apply|true_computation|false_computation|select|scatter)=%?([\w.\-]+)")
_CALLED_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


@dataclasses.dataclass(frozen=True)
class LoopWeights:
  """How often each line of an HLO module runs per step.

  line_weight[i]: executions per step of the instruction on line i (the product of the trip
  counts of the `while` loops around it; 1 outside any loop and for lines outside computations).
  trip_counts: `while` instruction name -> its trip count: the backend config's
  `known_trip_count` (XLA:CPU writes it) or else read off the loop's counter
  (`_counter_trip_count`; libtpu's compiled HLO has no `known_trip_count`).
  counted_from_counter: the loops of `trip_counts` whose count was read off the counter.
  loops_without_trip_count: `while` instructions with neither: their bodies are counted once
  per execution of the loop instruction (a lower bound), never guessed.
  """
  line_weight: tuple[float, ...]
  trip_counts: dict[str, int]
  counted_from_counter: tuple[str, ...]
  loops_without_trip_count: tuple[str, ...]


def _instruction_name(line: str) -> str:
  m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
  return m.group(1) if m else ""


# Any instruction: name, op, operand text (up to the first ")": compiled HLO prints operands as
# bare `%names`).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([\w\-]+)\(([^)]*)\)")


class _Module:
  """Instructions by name (names are unique in an HLO module) and computations' ROOTs."""

  def __init__(self, lines: list[str], body_lines: dict[str, list[int]]):
    self.lines = lines
    self.instructions: dict[str, tuple[str, list[str], str]] = {}  # name -> op, operands, line
    self.roots: dict[str, str] = {}
    self.parameters: dict[tuple[str, int], str] = {}  # (computation, number) -> name
    for computation, numbers in body_lines.items():
      for i in numbers:
        m = _INSTRUCTION.match(lines[i])
        if not m:
          continue
        name, op, operands = m.groups()
        self.instructions[name] = (op, re.findall(r"%([\w.\-]+)", operands), lines[i])
        if lines[i].lstrip().startswith("ROOT"):
          self.roots[computation] = name
        if op == "parameter":
          self.parameters[(computation, int(operands))] = name

  def through_copies(self, name: str) -> tuple[str, list[str], str, str]:
    """(op, operands, line, name) of `name`, looking through copies and bitcasts, and through a
    fusion of one op on its parameters (XLA:CPU wraps scalar adds and compares so): that op
    with the fusion's operands."""
    op, operands, line = self.instructions.get(name, ("", [], ""))
    while op in ("copy", "bitcast") and operands:
      name = operands[0]
      op, operands, line = self.instructions.get(name, ("", [], ""))
    fused = re.search(r"\bcalls=%?([\w.\-]+)", line) if op == "fusion" else None
    if fused:
      inner_op, inner, inner_line = self.instructions.get(
          self.roots.get(fused.group(1), ""), ("", [], ""))
      numbers = {v: k for (c, k), v in self.parameters.items() if c == fused.group(1)}
      if inner_op != "fusion" and inner and all(x in numbers for x in inner):
        return inner_op, [operands[numbers[x]] for x in inner], inner_line, name
    return op, operands, line, name

  def constant(self, name: str) -> int | None:
    op, _, line, _ = self.through_copies(name)
    m = re.search(r"\sconstant\((-?\d+)\)", line) if op == "constant" else None
    return int(m.group(1)) if m else None

  def tuple_index(self, name: str) -> int | None:
    """k when `name` is `get-tuple-element(parameter), index=k`."""
    op, operands, line, _ = self.through_copies(name)
    if op != "get-tuple-element" or self.through_copies(operands[0])[0] != "parameter":
      return None
    return int(re.search(r"\bindex=(\d+)", line).group(1))

  def compare_operands(self, computation: str) -> tuple[str, str] | None:
    """The (lhs, rhs) of the `direction=LT` compare at the ROOT of `computation`."""
    op, operands, line, _ = self.through_copies(self.roots.get(computation, ""))
    return (operands[0], operands[1]) if op == "compare" and "direction=LT" in line else None


def _counter_trip_count(module: _Module, while_line: str, body: str, condition: str
                        ) -> int | None:
  """The trip count of a `while` whose condition is `counter < N` (N a constant), the counter a
  tuple element that starts at a constant and that the body raises by a positive constant:
  ceil((N - start) / step), the pattern of `lax.scan` / `fori_loop` (what XLA's own trip count
  analysis matches). None for any other loop."""
  compared = module.compare_operands(condition)
  if compared is None:
    return None
  k, limit = module.tuple_index(compared[0]), module.constant(compared[1])
  init = module.through_copies(re.search(r"\swhile\(%?([\w.\-]+)", while_line).group(1))
  root = module.through_copies(module.roots.get(body, ""))
  if k is None or limit is None or init[0] != "tuple" or root[0] != "tuple":
    return None
  start = module.constant(init[1][k])
  op, operands, _, _ = module.through_copies(root[1][k])
  if start is None or op != "add" or len(operands) != 2:
    return None
  steps = [module.constant(b) for a, b in (operands, operands[::-1]) if module.tuple_index(a) == k]
  if not steps or steps[0] is None or steps[0] <= 0:
    return None
  return max(0, -(-(limit - start) // steps[0]))


@functools.lru_cache(maxsize=4)
def loop_weights(hlo: str) -> LoopWeights:
  """Executions per step of every line of compiled HLO text, from its call graph: a while's
  `body=` runs n times and its `condition=` n + 1 times per execution of the loop (n its
  backend config's `known_trip_count`, which XLA:CPU writes for `lax.scan` / `fori_loop` loops,
  else `_counter_trip_count`);
  `calls=` (fusions, async wrappers), `to_apply=`, and every branch of a conditional
  (`branch_computations`, `true_/false_computation`: counted as if each ran, an upper bound)
  once per execution of the calling instruction. A computation called from several places
  sums its callers; one that no instruction names (a fragment of a module) counts once."""
  lines = hlo.splitlines()
  body_lines: dict[str, list[int]] = {}  # computation -> its instruction line numbers
  owner: list[str | None] = [None] * len(lines)
  entry, current = None, None
  for i, line in enumerate(lines):
    if not line.startswith((" ", "\t")) and (header := _COMPUTATION_HEADER.match(line)):
      current = header.group(2)
      body_lines[current] = []
      entry = current if header.group(1) else entry
    elif current is not None and line.strip() == "}":
      current = None
    elif current is not None:
      body_lines[current].append(i)
      owner[i] = current
  callers: dict[str, list[tuple[str, int]]] = {}  # callee -> (caller, executions per call)
  trips: dict[str, int] = {}
  from_counter: list[str] = []
  untripped: list[str] = []
  module = None
  for name, numbers in body_lines.items():
    for i in numbers:
      line = lines[i]
      calls = [(c, 1) for c in _CALLED_ONCE.findall(line)]
      calls += [(c.strip().lstrip("%"), 1) for group in _CALLED_LISTS.findall(line)
                for c in group.split(",") if c.strip()]
      body = re.search(r"\bbody=%?([\w.\-]+)", line)
      cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
      if body and cond:
        loop, trip = _instruction_name(line), _TRIP_COUNT.search(line)
        n = int(trip.group(1)) if trip else None
        if n is None:
          module = module or _Module(lines, body_lines)
          n = _counter_trip_count(module, line, body.group(1), cond.group(1))
          from_counter += [loop] if n is not None else []
        if n is None:
          untripped.append(loop)
        else:
          trips[loop] = n
        runs = 1 if n is None else n
        calls += [(body.group(1), runs), (cond.group(1), 1 if n is None else n + 1)]
      for callee, n in calls:
        if callee in body_lines:
          callers.setdefault(callee, []).append((name, n))

  @functools.cache
  def executions(name: str) -> float:
    if name == entry or entry is None or name not in callers:
      return 1.0
    return float(sum(executions(caller) * n for caller, n in callers.get(name, [])))

  weight = tuple(1.0 if c is None else executions(c) for c in owner)
  return LoopWeights(weight, trips, tuple(from_counter), tuple(untripped))


# libtpu's reduce-scatter: a fused computation `%all-reduce-scatter.N (...) -> f32[64,32] {` of an
# all-reduce and the dynamic-slice that keeps this device's shard, run as one reduce-scatter
# (backend config `SingleInputAllReduceScatterFusion`): FSDP's gradient reduction on TPU.
_REDUCE_SCATTER_FUSION = re.compile(
    r"^\s*%?all-reduce-scatter[\w.-]*\s*\(.*\)\s*->\s*(.*?)\s*\{\s*$")


def _reduce_scatter_fusions(hlo: str) -> tuple[set[int], list[tuple[int, str, str]]]:
  """Line numbers of the all-reduces inside libtpu's all-reduce-scatter fusions, and (line
  number, fusion result shape text, all-reduce line) for each: a reduce-scatter whose result
  is the shard."""
  inside, fused, result = set(), [], None
  for i, line in enumerate(hlo.splitlines()):
    if (header := _REDUCE_SCATTER_FUSION.match(line)):
      result = header.group(1)
    elif result is not None and line.strip() == "}":
      result = None
    elif result is not None and re.search(r"\sall-reduce(-start)?\(", line):
      inside.add(i)
      fused.append((i, result, line))
  return inside, fused


def _collective_lines(hlo: str, op: str, *, fused_as_all_reduce: bool = False
                      ) -> list[tuple[str, str, float]]:
  """(result shape text, whole line, executions per step `loop_weights`) of each `op` (or async
  `op-start`) instruction of compiled HLO text, no-op ones (single-member replica groups) left
  out. The all-reduces of libtpu's
  all-reduce-scatter fusions count as reduce-scatters with the fusion's (shard) result, or, with
  `fused_as_all_reduce`, as all-reduces with their full result (what precision each reduction
  carries, full operand)."""
  pattern = re.compile(rf"=\s*(.*?)\s{op}(-start)?\(")
  inside, fused = _reduce_scatter_fusions(hlo)
  weight = loop_weights(hlo).line_weight
  lines = [(m.group(1), line, weight[i]) for i, line in enumerate(hlo.splitlines())
           if (m := pattern.search(line)) and not _is_no_op(line)
           and not (op == "all-reduce" and not fused_as_all_reduce and i in inside)]
  if op == "reduce-scatter" and not fused_as_all_reduce:
    lines += [(shape, line, weight[i]) for i, shape, line in fused if not _is_no_op(line)]
  return lines


def group_size(line: str, num_devices: int) -> int:
  """Devices per replica group of a collective instruction (`replica_groups`)."""
  return replica_groups(line, num_devices).shape[1]


# Bytes each device sends, per byte of the instruction's result, in a group of n devices
# (bandwidth-optimal ring / pairwise algorithms): an all-reduce is a reduce-scatter then an
# all-gather; an all-gather's result is n times what each device holds; a reduce-scatter's
# operand is n times its result; an all-to-all keeps 1/n; a permute sends everything. A
# ragged-all-to-all's result is its receive buffer, an upper bound on what arrives.
_SENT_PER_RESULT_BYTE = {
    "all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: n - 1, "all-to-all": lambda n: (n - 1) / n,
    "ragged-all-to-all": lambda n: (n - 1) / n, "collective-permute": lambda n: 1.0}


def collective_wire_bytes(hlo: str, num_devices: int) -> dict[str, float]:
  """Bytes each device sends per step and op (all its instructions of that op together, each
  times its executions per step), from the result sizes and replica-group sizes of the compiled
  SPMD HLO (`_SENT_PER_RESULT_BYTE`)."""
  return {op: sum(_shape_bytes(shape) * _SENT_PER_RESULT_BYTE[op](group_size(line, num_devices))
                  * n for shape, line, n in _collective_lines(hlo, op)) for op in COLLECTIVES}


def replica_groups(line: str, num_devices: int) -> np.ndarray:
  """`[groups, members]` device indices (into the program's device assignment) of a collective
  instruction: listed `replica_groups={{0,1},{2,3}}`, iota `[2,4]<=[8]` / `[2,4]<=[4,2]T(1,0)`,
  the mesh form `mesh['axis_0'=2,'axis_1'=4] {'axis_0'}`, a permute's `source_target_pairs`, or
  one group of all devices when absent."""
  listed = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}",
                     line)
  if listed:
    groups = [[int(i) for i in g.split(",") if i]
              for g in re.findall(r"\{([\d,]*)\}", listed.group(1))]
    return np.array(groups).reshape(len(groups), -1)
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if iota:
    ids = np.arange(num_devices).reshape([int(d) for d in iota.group(3).split(",")])
    if iota.group(4):
      ids = ids.transpose([int(p) for p in iota.group(4).split(",")])
    return ids.reshape(int(iota.group(1)), int(iota.group(2)))
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if mesh:
    axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    grouped = [names.index(a) for a in re.findall(r"'([^']+)'", mesh.group(2))]
    rest = [i for i in range(len(names)) if i not in grouped]
    ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(rest + grouped)
    return ids.reshape(-1, math.prod(sizes[i] for i in grouped))
  return np.arange(num_devices)[None]


# Bytes each device sends over the data-center network per byte of a collective's result, when
# its groups span s slices of m members each (hierarchical: the ICI part inside each slice first,
# so only 1/m of the data per device crosses slices for all-reduce / all-gather).
_DCN_PER_RESULT_BYTE = {
    "all-reduce": lambda s, m: 2 * (s - 1) / s / m, "all-gather": lambda s, m: (s - 1) / s / m,
    "reduce-scatter": lambda s, m: s - 1, "all-to-all": lambda s, m: (s - 1) / s,
    "ragged-all-to-all": lambda s, m: (s - 1) / s, "collective-permute": lambda s, m: 1.0}


def collective_dcn_bytes(hlo: str, slice_of: Sequence[int]) -> dict[str, float]:
  """Bytes each device sends across slices per step and op (`_DCN_PER_RESULT_BYTE`),
  `slice_of[i]` the slice of device i of the program's device assignment (s = the number of
  slices).

  A multi-slice TPU program (libtpu) is one slice's: its cross-slice steps are host transfers to
  the megascale runtime, `send(...)` with `_xla_megascale_transfer_type="ALL_REDUCE"` (etc.) of
  this device's share, counted with m = 1. Elsewhere (XLA:CPU, simulated slices) one program
  spans all slices: the collectives whose replica groups cross slices are counted."""
  slice_of = np.asarray(slice_of)
  out = {op: 0.0 for op in COLLECTIVES}
  slices = len(set(slice_of.tolist()))
  weight = loop_weights(hlo).line_weight
  for i, line in enumerate(hlo.splitlines()):
    transfer = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
    if transfer and re.search(r"=\s*\(?\s*\w+\[[\d,]*\][^=]*\ssend\(", line):
      op = transfer.group(1).lower().replace("_", "-")
      out[op] += (_array_bytes(line.split("=", 1)[1]) * _DCN_PER_RESULT_BYTE[op](slices, 1)
                  * weight[i])
  if any(out.values()):  # one slice's program: its replica groups never leave the slice
    return out
  for op in COLLECTIVES:
    for shape, line, n in _collective_lines(hlo, op):
      groups = slice_of[replica_groups(line, len(slice_of))]
      s = max(len(set(g.tolist())) for g in groups)
      if s > 1:
        out[op] += _shape_bytes(shape) * _DCN_PER_RESULT_BYTE[op](s, groups.shape[1] / s) * n
  return out


def reduction_elements_by_dtype(hlo: str, num_devices: int) -> dict[str, int]:
  """Element dtype (HLO name: "f32", "bf16", ...) -> elements per device that the cross-device
  sums carry per step (what precision the gradient reductions run in), over every all-reduce (those
  libtpu fuses into reduce-scatters included, full operand) and reduce-scatter (its operand:
  the result times the group size); tuple results element by element."""
  totals: dict[str, int] = {}
  reductions = ([(shape, n) for shape, _, n in
                 _collective_lines(hlo, "all-reduce", fused_as_all_reduce=True)]
                + [(shape, group_size(line, num_devices) * n) for shape, line, n in
                   _collective_lines(hlo, "reduce-scatter", fused_as_all_reduce=True)])
  for shape, operand_per_result in reductions:
    for dtype, n in _array_shapes(shape):
      totals[dtype] = totals.get(dtype, 0) + int(n * operand_per_result)
  return totals


def collective_counts(hlo: str) -> dict[str, int]:
  """Collective instructions of compiled HLO text by op (async `-start`s counted once; an
  instruction in a loop body once, see `collective_executions`)."""
  return {op: len(_collective_lines(hlo, op)) for op in COLLECTIVES}


def collective_executions(hlo: str) -> dict[str, int]:
  """Collectives each device runs per step, by op: `collective_counts` with every instruction
  times its executions per step (`loop_weights`)."""
  return {op: int(sum(n for _, _, n in _collective_lines(hlo, op))) for op in COLLECTIVES}


def collective_bytes(hlo: str, op: str) -> int:
  """Sum over the `op` instructions (all-to-all, all-reduce, ...) of their operand sizes times
  their executions per step, in bytes, per device (the compiled SPMD HLO is the program one
  device runs). These collectives'
  results have exactly their operands' shapes (compiled HLO prints operands without shapes), so
  the result shapes are summed."""
  return int(sum(_shape_bytes(shape) * n for shape, _, n in _collective_lines(hlo, op)))


def all_to_all_bytes(hlo: str) -> int:
  """All-to-all operand bytes per device (see `collective_bytes`)."""
  return collective_bytes(hlo, "all-to-all")


def stablehlo_all_to_all_bytes(text: str) -> int:
  """Operand bytes of the `stablehlo.all_to_all` ops of a lowered (pre-XLA) program: what the
  program asks to send, before a backend's own passes (XLA:CPU computes bf16 in f32)."""
  return sum(_tensor_bytes(operands) for operands in
             re.findall(r"stablehlo\.all_to_all.*?:\s*\((.*?)\)\s*->", text))


# An instruction `%name = f32[8,16]{1,0} op(%a, %b), attrs` (array result): name, dims, op, rest.
_ARRAY_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[a-z]+\d*\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)$")


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def _window_attr(window: str, key: str, spatial: int, default: int) -> list[str]:
  m = re.search(rf"\b{key}=(\S+)", window)
  return m.group(1).split("x") if m else [str(default)] * spatial


def _conv_flops(line: str, lhs: list[int], kernel: list[int], out: list[int]) -> int:
  """2 x (output batch x features) x input features per group x the (output position, kernel
  tap) pairs per spatial dim that land inside the (dilated) input: padding taps are not
  counted, as XLA's HloCostAnalysis does."""
  lhs_labels, kernel_labels, out_labels = re.search(
      r"dim_labels=([^_]*)_([^-]*)->(\S+?)[,\s]", line + " ").groups()
  spatial = sum(c.isdigit() for c in out_labels)
  window = re.search(r"window=\{([^}]*)\}", line)
  window = window.group(1) if window else ""
  size = [int(n) for n in _window_attr(window, "size", spatial, 1)]
  stride = [int(n) for n in _window_attr(window, "stride", spatial, 1)]
  pad = [int(p.split("_")[0]) for p in _window_attr(window, "pad", spatial, 0)]
  lhs_dilate = [int(n) for n in _window_attr(window, "lhs_dilate", spatial, 1)]
  rhs_dilate = [int(n) for n in _window_attr(window, "rhs_dilate", spatial, 1)]
  pairs = 1
  for d in range(spatial):
    extent = (lhs[lhs_labels.index(str(d))] - 1) * lhs_dilate[d] + 1
    positions = [o * stride[d] + k * rhs_dilate[d] - pad[d]
                 for o in range(out[out_labels.index(str(d))]) for k in range(size[d])]
    pairs *= sum(0 <= p < extent and p % lhs_dilate[d] == 0 for p in positions)
  non_spatial = math.prod(n for n, c in zip(out, out_labels) if not c.isdigit())
  return 2 * non_spatial * kernel[kernel_labels.index("i")] * pairs


def dot_conv_flops(hlo: str, *, per_step: bool = True) -> float:
  """FLOPs per device of the dots and convolutions of compiled HLO text: a dot 2 x output
  elements x the product of its lhs contracting dims; a convolution 2 x output elements x
  kernel taps x input features per group, padding taps left out (`_conv_flops`).
  `per_step`: each instruction times its executions per step (`loop_weights`); else every
  loop body once, as XLA's `cost_analysis()` counts. Elementwise ops and custom calls are not
  counted (on a matmul-heavy step they are a few % of XLA's FLOPs)."""
  lines = hlo.splitlines()
  weight = loop_weights(hlo).line_weight
  dims: dict[str, list[int]] = {}  # instruction name -> result dims (names are module-unique)
  products = []
  for i, line in enumerate(lines):
    m = _ARRAY_INSTRUCTION.match(line)
    if not m:
      continue
    name, out_dims, op, rest = m.groups()
    dims[name] = _dims(out_dims)
    if op in ("dot", "convolution"):
      products.append((i, op, dims[name], re.findall(r"%([\w.\-]+)", rest), line))
  total = 0.0
  for i, op, out_dims, operands, line in products:
    out_elements = math.prod(out_dims)
    if op == "dot":
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
      lhs = dims[operands[0]]
      per_output = math.prod(lhs[d] for d in _dims(contracting.group(1))) if contracting else 1
      flops = 2 * out_elements * per_output
    else:
      flops = _conv_flops(line, dims[operands[0]], dims[operands[1]], out_dims)
    total += flops * (weight[i] if per_step else 1)
  return total


def _op_name(line: str) -> str:
  """The JAX operation an instruction comes from (`metadata={op_name="..."}`), or ""."""
  m = re.search(r'op_name="([^"]*)"', line)
  return m.group(1) if m else ""


def largest_collectives(hlo: str, num_devices: int, count: int = 10) -> list[dict]:
  """The `count` collective instructions of compiled HLO that send the most bytes per device
  and step, largest first: `op`, result `shape` (text), `sent_bytes` per step
  (`_SENT_PER_RESULT_BYTE` times `executions` per step), devices per `group`, and the JAX
  `op_name` it was lowered from (which weight or activation it moves; e.g. a
  `transpose(jvp(...))/dot_general` all-reduce is a weight gradient)."""
  rows = []
  for op in COLLECTIVES:
    for shape, line, runs in _collective_lines(hlo, op):
      n = group_size(line, num_devices)
      rows.append(dict(op=op, shape=re.sub(r"\{[^}]*\}", "", shape).strip(),
                       sent_bytes=_shape_bytes(shape) * _SENT_PER_RESULT_BYTE[op](n) * runs,
                       executions=int(runs), group=n, op_name=_op_name(line)))
  return sorted(rows, key=lambda r: -r["sent_bytes"])[:count]
