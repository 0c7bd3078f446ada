"""Static GPU tier: compile a Triton kernel for Hopper (sm_90) on a machine without a GPU.

``compile_sm90`` compiles one kernel configuration with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` and reads the cubin's resource usage with the ``cuobjdump`` shipped
inside the triton wheel (``triton/backends/nvidia/bin``). It reports registers per thread,
local-memory bytes (spills / stack) and shared memory, so tests can reject configs that spill or
overflow the H100's 227 KB of shared memory per block before any GPU time is spent.

Under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` on CPU-only machines) ``@triton.jit``
returns interpreter objects that cannot be compiled, and the helpers they call are interpreter
objects too. So when interpreting, the compile runs in a subprocess with ``TRITON_INTERPRET=0``
that re-imports the kernel by module and attribute name (the kernel must be a module-level
attribute; ``@triton.autotune``/``@triton.heuristics`` wrappers are unwrapped).

API (other test modules rely on it; keep it stable)::

    compile_sm90(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict

``signature`` maps every argument name of the kernel to a Triton type string (``"*fp16"``,
``"*bf16"``, ``"*fp32"``, ``"*i32"``, ``"i32"``, ``"i64"``, ``"fp32"``, ...); constexpr arguments may
be given as ``"constexpr"`` in ``signature`` or left out (they are added). ``constexprs`` maps
constexpr argument names to values (ints, bools, floats, strings). The result dict has:

    name            kernel name in the cubin
    registers       registers per thread (REG)
    local_bytes     local memory per thread, LOCAL + STACK (ptxas places spills in the stack frame,
                    so STACK > 0 usually means spills; 0 is what we want)
    stack_bytes     STACK from cuobjdump
    local_insts     number of STL/LDL (local store/load) instructions in the SASS
    shared_bytes    static shared memory from cuobjdump (SHARED) -- usually 0 for Triton
    triton_shared   dynamic shared memory Triton requests at launch (metadata.shared)
    shared_total    max(shared_bytes + triton_shared) -- compare against H100_SHARED_LIMIT
    spilled         bool, local_bytes > 0 or local_insts > 0
    num_warps, num_stages
    hgmma           bool, the SASS contains HGMMA (Hopper warpgroup MMA) instructions
    ptxas_info      the text of cuobjdump's resource-usage report
    ptxas_log       everything ptxas printed for the kernel's PTX (``-v``; ptxas is re-run on the PTX
                    with Triton's flags and the PTX's own ``.target``, so the log exists even when
                    the cubin came from Triton's cache)
    ptxas_warnings  the lines of that log that are warnings or coded notes: ptxas prints some
                    performance warnings as ``ptxas info : (C7515) Potential Performance Loss: ...``
                    (an info line with a code), so both forms are kept (``ptxas_warning_lines``)
    wgmma_serialized  bool: ptxas says wgmma.mma_async was serialised (C7515 and similar):
                    the async wgmma pipeline silently became a serial one
    hgmma_shapes    {"64x128x16.F32.BF16": count, ...}: the HGMMA instructions in the SASS
    local_insts_in_loops  STL/LDL instructions inside loop bodies (between a backward branch and its
                    target in the SASS); spills outside loops are cheap, these are not
    wgmma_operands  ``wgmma_operands(ttgir)``: one dict per shared-memory operand of an async wgmma
                    (ttng.warp_group_dot with isAsync) in the TTGIR: {"dot", "operand" ("a"/"b"),
                    "shape", "buffers" (leading dim of the multi-buffered ttg.local_alloc it is read
                    from; 1 for a single buffer; None when the def chain could not be followed, e.g. a
                    loop-carried block argument), "pipelined" (read from a mutable buffer),
                    "copy_target" (an async copy, cp.async or TMA, writes into that alloc: it is
                    refilled while the loop runs), "pendings" (the count of the warp_group_dot_wait
                    that follows the dot, None if none)}
    smem_buffer_issues  list of str: pipelined async-wgmma operands with fewer shared-memory buffers
                    than num_stages (a buffer read by a pending wgmma while cp.async refills it: the
                    race of Triton issue 6691)
    ttgir_op_counts {"scf.if": n, "scf.for": n, "async_tma_copy_global_to_local": n,
                    "async_copy_global_to_local": n (cp.async), "warp_group_dot_wait": n} in the TTGIR
    refill_races    list of str, ``refill_races(wgmma_operands)``: operands an async copy refills
                    with no more buffers than the wgmmas left pending by the following wait, so the
                    next copy overwrites what a pending wgmma still reads (the precise form of the
                    race; it holds for loops that use fewer buffers than num_stages on purpose)

``sm90_problems(res, shared_limit=H100_SHARED_LIMIT)`` lists what the static rules reject in one
result (wgmma serialisation, local loads/stores inside loops, shared memory over the limit, too few
buffers for async wgmma operands (fewer than num_stages, or a refill race), no HGMMA when
``need_hgmma``); ``assert_sm90_ok(res, label)``
raises an AssertionError naming each problem; ``compile_sm90_checked(...)`` is ``compile_sm90`` plus
``assert_sm90_ok``.

An optional keyword ``divisible_by_16`` (argument names) marks pointers/ints as 16-divisible, the
specialisation Triton's launcher applies at run time to aligned pointers and strides.

``compile_sm90_many(jobs)`` compiles a list of ``dict(kernel=..., signature=..., constexprs=...,
num_warps=..., num_stages=..., divisible_by_16=...)`` in one subprocess (one import of torch/triton instead of many).
A job may add ``arch=80`` (or 86, 89) to compile for that GPU instead of sm_90 (shared-memory
checks of pre-Hopper configs; no HGMMA there), and ``maxnreg=N`` (a register cap per thread, as
``triton.Config(maxnreg=N)`` passes to ptxas).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

H100_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (opt-in maximum)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- kernel handling
def _unwrap(kernel):
    """Strip @triton.autotune / @triton.heuristics wrappers (they keep the inner kernel in .fn)."""
    seen = 0
    while True:
        cls_name = type(kernel).__name__
        if cls_name in ("Autotuner", "Heuristics") and hasattr(kernel, "fn"):
            kernel = kernel.fn
            seen += 1
            if seen > 8:
                raise TypeError("compile_sm90: too many nested autotune/heuristics wrappers")
            continue
        return kernel


def _kernel_address(kernel):
    """(module, attribute) under which a kernel can be re-imported in a subprocess."""
    inner = _unwrap(kernel)
    fn = getattr(inner, "fn", inner)
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__name__", None)
    if not module or not name:
        raise TypeError(f"compile_sm90: cannot locate kernel {kernel!r} (no __module__/__name__)")
    mod = sys.modules.get(module)
    if mod is not None and getattr(mod, name, None) is None:
        raise TypeError(
            f"compile_sm90: kernel {name!r} is not a module-level attribute of {module!r}; it cannot be "
            "re-imported for compilation in a subprocess"
        )
    return module, name


def _is_interpreted(kernel) -> bool:
    return type(_unwrap(kernel)).__name__ == "InterpretedFunction"


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"compile_sm90: constexpr values must be bool/int/float/str/None, got {type(value).__name__}")


# ----------------------------------------------------------------------------- in-process compile
def _cuobjdump_path() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"compile_sm90: cuobjdump not found in the triton wheel at {path}")
    return path


_RES_RE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def _resource_usage(cubin: bytes) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        # One call prints both the resource usage and the SASS.
        res = subprocess.run(
            [_cuobjdump_path(), "--dump-resource-usage", "--dump-sass", path], capture_output=True, text=True, check=True
        )
    sass = res
    usage = {"REG": 0, "STACK": 0, "SHARED": 0, "LOCAL": 0}
    name = ""
    resource_lines = [ln for ln in res.stdout.splitlines() if "REG:" in ln or re.search(r"Function [^\s:]+:", ln)]
    for line in resource_lines:
        m = re.search(r"Function ([^\s:]+):", line)
        if m:
            name = m.group(1)
        found = dict(_RES_RE.findall(line))
        for key, val in found.items():
            usage[key] = max(usage[key], int(val))
    # Local loads/stores in the SASS: spills (or stack arrays). ptxas puts spills in the stack
    # frame, which cuobjdump reports as STACK (LOCAL is usually 0 even for a spilling kernel).
    local_insts = len(re.findall(r"\b(?:STL|LDL)(?:\.[A-Z0-9]+)*\s", sass.stdout))
    shapes: Dict[str, int] = {}
    for shape in re.findall(r"\bHGMMA\.([0-9]+x[0-9]+x[0-9]+(?:\.[A-Z0-9]+)*)", sass.stdout):
        shapes[shape] = shapes.get(shape, 0) + 1
    return {
        "name": name,
        "usage": usage,
        "hgmma": "HGMMA" in sass.stdout,
        "hgmma_shapes": shapes,
        "local_insts": local_insts,
        "local_insts_in_loops": _local_insts_in_loops(sass.stdout),
        "resource_text": "\n".join(resource_lines),
    }


_SASS_INST_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def _local_insts_in_loops(sass: str) -> int:
    """STL/LDL inside a loop body: between the target of a backward branch and the branch."""
    insts = [(int(addr, 16), text) for addr, text in _SASS_INST_RE.findall(sass)]
    loops = []
    for addr, text in insts:
        m = re.search(r"\bBRA(?:\.[A-Z]+)*\s+(?:`\()?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    return sum(
        1 for addr, text in insts
        if re.search(r"\b(?:STL|LDL)\b", text) and any(lo <= addr <= hi for lo, hi in loops)
    )


# ----------------------------------------------------------------------------- ptxas log and warnings
_WGMMA_SERIAL_RE = re.compile(r"C7515|C7510|wgmma[^\n]*serializ", re.IGNORECASE)
_PTXAS_CODE_RE = re.compile(r"\(C\d{4}\)")


def ptxas_warning_lines(log: str) -> List[str]:
    """The lines of a ptxas log that are warnings or coded notes: ptxas prints C7515 (wgmma
    serialised) as ``ptxas info    : (C7515) Potential Performance Loss: ...``, not as a warning."""
    return [ln.strip() for ln in log.splitlines() if "warning" in ln.lower() or _PTXAS_CODE_RE.search(ln)]


def _ptxas_log(ptx: str, arch: str = "") -> str:
    """Everything ptxas prints for this PTX, with the flags Triton uses (-lineinfo -v) and the
    PTX's own ``.target`` (``arch`` is the fallback). Triton drops the ptxas log unless it fails, and
    skips ptxas entirely on a cache hit, so re-run it here (about 0.5 s per kernel); the log is
    cached by the PTX's hash."""
    import hashlib

    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    arch = target.group(1) if target else (arch or "sm_90a")
    key = hashlib.sha256((arch + ptx).encode()).hexdigest()[:32]
    cache_dir = os.path.join(os.path.expanduser(os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")), "sm90_ptxas")
    cache = os.path.join(cache_dir, key + ".log")
    if os.path.exists(cache):
        with open(cache) as f:
            return f.read()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [get_ptxas(90).path, "-lineinfo", "-v", f"--gpu-name={arch}", src, "-o", src + ".o"],
            capture_output=True, text=True,
        )
        log = proc.stdout + proc.stderr
    os.makedirs(cache_dir, exist_ok=True)
    with open(cache, "w") as f:
        f.write(log)
    return log


# ----------------------------------------------------------------------------- TTGIR: wgmma operand buffers
_SSA_DEF_RE = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_SSA_NAME_RE = re.compile(r"%[\w.$#-]+")
_MEMDESC_RE = re.compile(r"!ttg\.memdesc<([0-9x]+)x[a-zA-Z]\w*,")


def wgmma_operands(ttgir: str) -> List[Dict[str, Any]]:
    """Shared-memory operands of every asynchronous warpgroup MMA, with the buffers behind each.

    Each shared operand of a ``ttng.warp_group_dot ... isAsync = true`` is traced back through
    ``ttg.memdesc_*`` views (``memdesc_index``, ``memdesc_trans``, ...; ``ttng.memdesc_trans`` too) to
    its ``ttg.local_alloc``, using the latest definition of a name before its use (MLIR scopes names
    per region, so a name can be defined again in another region). Register operands are skipped.
    Per operand: ``dot`` (index of the async dot in the TTGIR), ``operand`` ("a"/"b"), ``shape``
    (list of ints), ``buffers`` (the alloc's leading dim when it has one more dim than the operand,
    ``3x128x64`` behind ``128x64`` is 3; else 1; None when the chain ends in a block argument or
    another op), ``pipelined`` (the alloc is mutable; None when unresolved), ``copy_target`` (an async
    copy, cp.async or TMA ``*copy_global_to_local``, writes into a view of that alloc) and
    ``pendings`` (the ``pendings`` of the ``warp_group_dot_wait`` within the next 5 lines, else None).
    """
    parent: Dict[str, str] = {}  # memdesc view -> the value it is a view of
    allocs: Dict[str, tuple] = {}  # alloc value -> (line index, dims, mutable), latest definition
    copy_targets = set()  # line indices of allocs an async copy writes into
    lines = ttgir.splitlines()

    def root(value: str):
        value = value.split("#")[0]
        for _ in range(64):
            if value not in parent:
                break
            value = parent[value].split("#")[0]
        return allocs.get(value)

    found = []
    dot_count = 0
    for i, line in enumerate(lines):
        m = _SSA_DEF_RE.match(line)
        name, op, rest = m.groups() if m else (None, "", line)
        if "copy_global_to_local" in line:  # a TMA copy has no result: look at the whole line then
            for value in _SSA_NAME_RE.findall(rest if m else line):
                src = root(value)
                if src is not None:
                    copy_targets.add(src[0])
        if not m:
            continue
        parent.pop(name, None)
        allocs.pop(name, None)
        if op == "ttg.local_alloc":
            dm = _MEMDESC_RE.search(rest.split("->")[-1])
            if dm:
                allocs[name] = (i, [int(d) for d in dm.group(1).split("x")], "mutable" in rest.split("->")[-1])
        elif op.startswith("ttg.memdesc_") or op == "ttng.memdesc_trans":
            src = re.match(r"\s*(%[\w.$#-]+)", rest)
            if src:
                parent[name] = src.group(1)
        elif op == "ttng.warp_group_dot" and "isAsync = true" in rest:
            operands = re.match(r"\s*(%[\w.$#-]+),\s*(%[\w.$#-]+),", rest)
            types = rest.split("} :", 1)[1] if "} :" in rest else rest.split(" : ", 1)[-1]
            type_parts = types.split(" * ")
            pendings = None
            for later in lines[i + 1:i + 6]:
                if "warp_group_dot_wait" in later:
                    pm = re.search(r"pendings = (\d+)", later)
                    pendings = int(pm.group(1)) if pm else None
                    break
            dot_count += 1
            for slot, value in zip(("a", "b"), operands.groups() if operands else ()):
                ty = type_parts[0 if slot == "a" else 1] if len(type_parts) > 1 else ""
                if "!ttg.memdesc" not in ty:
                    continue  # a register operand (ttg.dot_op layout)
                shape_m = _MEMDESC_RE.search(ty)
                shape = [int(d) for d in shape_m.group(1).split("x")] if shape_m else None
                src = root(value)
                entry = {"dot": dot_count - 1, "operand": slot, "shape": shape, "buffers": None, "pipelined": None,
                         "copy_target": False, "pendings": pendings, "_alloc": None}
                if src is not None:
                    line_index, dims, mutable = src
                    entry.update(
                        buffers=dims[0] if shape is not None and len(dims) == len(shape) + 1 else 1,
                        pipelined=mutable, _alloc=line_index,
                    )
                found.append(entry)
    for f in found:
        f["copy_target"] = f.pop("_alloc") in copy_targets
    return found


_wgmma_operands = wgmma_operands  # the name the parser self-test uses


def refill_races(operands: List[Dict[str, Any]]) -> List[str]:
    """Async-wgmma operands an async copy refills with no more shared buffers than the wgmmas the
    following wait leaves pending: the next copy overwrites a buffer a pending wgmma still reads
    (Triton issue 6691; the old modality dW/db kernel had it with one buffer and one pending)."""
    return [
        f"async wgmma {o['dot']} operand {o['operand']} {o['shape']}: {o['buffers']} shared-memory buffer(s), "
        f"{o['pendings']} wgmma pending while cp.async refills it"
        for o in operands
        if o["copy_target"] and o["buffers"] is not None and (o["pendings"] or 0) >= o["buffers"]
    ]


_TTGIR_COUNTED_OPS = ("scf.if", "scf.for", "async_tma_copy_global_to_local", "async_copy_global_to_local",
                      "warp_group_dot_wait")


def ttgir_op_counts(ttgir: str) -> Dict[str, int]:
    """How often a few ops occur in the TTGIR: branches (``scf.if``), loops (``scf.for``), TMA and
    cp.async copies, wgmma waits (the TMA kernel's "one loop, no branch" claim is checked on it)."""
    counts = {op: len(re.findall(r"\b(?:ttng\.|ttg\.)?" + re.escape(op) + r"\b", ttgir)) for op in _TTGIR_COUNTED_OPS}
    # "async_copy_global_to_local" is also a suffix of the TMA op: count the cp.async ones alone
    counts["async_copy_global_to_local"] = len(re.findall(r"\bttg\.async_copy_global_to_local\b", ttgir))
    return counts


def _compile_inprocess(
    kernel, signature, constexprs, num_warps, num_stages, divisible_by_16=(), arch=90, maxnreg=None
) -> Dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = _unwrap(kernel)
    if type(jit_fn).__name__ == "InterpretedFunction":
        raise RuntimeError("compile_sm90: got an interpreter kernel in-process; TRITON_INTERPRET must be 0 here")
    constexprs = dict(constexprs or {})
    signature = dict(signature)
    for name in constexprs:
        signature.setdefault(name, "constexpr")
    missing = [a for a in jit_fn.arg_names if a not in signature]
    if missing:
        raise ValueError(f"compile_sm90: signature lacks arguments {missing} of kernel {jit_fn.__name__}")
    signature = {a: signature[a] for a in jit_fn.arg_names}
    # What Triton's launcher infers at run time for 16-aligned pointers and multiples of 16.
    attrs = {(jit_fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, "num_ctas": 1,
                 **({"maxnreg": maxnreg} if maxnreg else {})},
    )
    cubin = compiled.asm["cubin"]
    info = _resource_usage(cubin)
    triton_shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    usage = info["usage"]
    local = usage["LOCAL"] + usage["STACK"]
    ptxas_log = _ptxas_log(compiled.asm["ptx"], "sm_90a" if arch == 90 else f"sm_{arch}")
    warnings = ptxas_warning_lines(ptxas_log)
    operands = wgmma_operands(compiled.asm["ttgir"])
    buffer_issues = [
        f"async wgmma {o['dot']} operand {o['operand']} {o['shape']}: {o['buffers']} shared-memory buffer(s) "
        f"< num_stages={num_stages}"
        for o in operands
        if num_stages > 1 and o["pipelined"] and o["buffers"] is not None and o["buffers"] < num_stages
    ]
    return {
        "name": info["name"] or jit_fn.__name__,
        "registers": usage["REG"],
        "local_bytes": local,
        "stack_bytes": usage["STACK"],
        "shared_bytes": usage["SHARED"],
        "triton_shared": triton_shared,
        "shared_total": usage["SHARED"] + triton_shared,
        "local_insts": info["local_insts"],
        "spilled": local > 0 or info["local_insts"] > 0,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "hgmma": info["hgmma"],
        "hgmma_shapes": info["hgmma_shapes"],
        "local_insts_in_loops": info["local_insts_in_loops"],
        "ptxas_info": info["resource_text"],
        "ptxas_log": ptxas_log,
        "ptxas_warnings": warnings,
        "wgmma_serialized": any(_WGMMA_SERIAL_RE.search(w) for w in warnings),
        "wgmma_operands": operands,
        "smem_buffer_issues": buffer_issues,
        "refill_races": refill_races(operands),
        "ttgir_op_counts": ttgir_op_counts(compiled.asm["ttgir"]),
    }


# ----------------------------------------------------------------------------- subprocess path
def _run_subprocess(jobs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    payload = []
    for job in jobs:
        module, name = _kernel_address(job["kernel"])
        payload.append(
            {
                "module": module,
                "name": name,
                "signature": dict(job["signature"]),
                "constexprs": {k: _jsonable(v) for k, v in dict(job.get("constexprs") or {}).items()},
                "num_warps": int(job["num_warps"]),
                "num_stages": int(job["num_stages"]),
                "divisible_by_16": list(job.get("divisible_by_16") or ()),
                "arch": int(job.get("arch", 90)),
                "maxnreg": job.get("maxnreg"),
            }
        )
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")) if p)
    # Compiles are CPU-bound (MLIR passes, ptxas): spread them over a few worker processes.
    workers = max(1, min(len(payload), int(os.environ.get("SM90_COMPILE_WORKERS", os.cpu_count() or 1))))
    chunks = [list(range(i, len(payload), workers)) for i in range(workers)]

    def run_chunk(indices):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__)],
            input=json.dumps([payload[i] for i in indices]),
            capture_output=True,
            text=True,
            env=env,
            cwd=_REPO_ROOT,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"compile_sm90 subprocess failed (rc={proc.returncode}):\n{proc.stderr[-8000:]}")
        marker = "@@SM90_RESULTS@@"
        return json.loads(proc.stdout[proc.stdout.rindex(marker) + len(marker):])

    from concurrent.futures import ThreadPoolExecutor

    results: List[Dict[str, Any]] = [None] * len(payload)  # type: ignore[list-item]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for indices, chunk_results in zip(chunks, pool.map(run_chunk, chunks)):
            for i, r in zip(indices, chunk_results):
                results[i] = r
    for r in results:
        if "error" in r:
            raise RuntimeError(f"compile_sm90: compiling {r['kernel']} failed:\n{r['error']}")
    return results


def _subprocess_main():
    import traceback

    jobs = json.loads(sys.stdin.read())
    results = []
    for job in jobs:
        try:
            mod = importlib.import_module(job["module"])
            kernel = getattr(mod, job["name"])
            results.append(
                _compile_inprocess(
                    kernel, job["signature"], job["constexprs"], job["num_warps"], job["num_stages"], job["divisible_by_16"],
                    job["arch"], job.get("maxnreg"),
                )
            )
        except Exception:  # report per job; the parent raises with the traceback
            results.append({"kernel": f"{job['module']}.{job['name']}", "error": traceback.format_exc()})
    sys.stdout.write("@@SM90_RESULTS@@" + json.dumps(results))


# ----------------------------------------------------------------------------- public API
def compile_sm90(
    kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int, divisible_by_16=()
) -> dict:
    """Compile one config of ``kernel`` for sm_90 and return its resource usage (see module doc).

    ``divisible_by_16`` (optional) names pointer/int arguments to mark 16-divisible, as Triton's
    launcher does at run time for aligned pointers and strides (enables vectorised accesses).
    """
    return compile_sm90_many(
        [
            dict(
                kernel=kernel, signature=signature, constexprs=constexprs, num_warps=num_warps,
                num_stages=num_stages, divisible_by_16=divisible_by_16,
            )
        ]
    )[0]


def compile_sm90_many(jobs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Compile many configs; one subprocess for all of them when the interpreter is on."""
    if any(_is_interpreted(j["kernel"]) for j in jobs) or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _run_subprocess(jobs)
    return [
        _compile_inprocess(
            j["kernel"], j["signature"], j.get("constexprs") or {}, j["num_warps"], j["num_stages"],
            j.get("divisible_by_16") or (), int(j.get("arch", 90)), j.get("maxnreg"),
        )
        for j in jobs
    ]


def sm90_problems(res: Dict[str, Any], shared_limit: int = H100_SHARED_LIMIT, need_hgmma: bool = False) -> List[str]:
    """What the static rules reject in one ``compile_sm90`` result (empty list: fine)."""
    problems = []
    if res["wgmma_serialized"]:
        problems.append("ptxas serialised wgmma: " + " | ".join(w for w in res["ptxas_warnings"] if _WGMMA_SERIAL_RE.search(w)))
    if res["local_insts_in_loops"]:
        problems.append(f"{res['local_insts_in_loops']} local loads/stores (spills) inside loop bodies")
    if res["shared_total"] > shared_limit:
        problems.append(f"{res['shared_total']} B shared memory > {shared_limit}")
    problems.extend(res["smem_buffer_issues"])
    problems.extend(res.get("refill_races", ()))
    if need_hgmma and not res["hgmma"]:
        problems.append("no HGMMA instruction in the SASS")
    return problems


def assert_sm90_ok(res: Dict[str, Any], label: str = "", **kwargs) -> None:
    problems = sm90_problems(res, **kwargs)
    if problems:
        raise AssertionError(
            f"{label or res['name']} (w{res['num_warps']} s{res['num_stages']}, {res['registers']} regs, "
            f"HGMMA {res['hgmma_shapes']}): " + "; ".join(problems)
        )


def compile_sm90_checked(
    kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int, divisible_by_16=(), **check_kwargs
) -> dict:
    """``compile_sm90`` then ``assert_sm90_ok``: raises on wgmma serialisation and the other rules."""
    res = compile_sm90(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16)
    assert_sm90_ok(res, **check_kwargs)
    return res


if __name__ == "__main__":
    _subprocess_main()
