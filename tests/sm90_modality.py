"""Static sm_90 tier, the checks tests/sm90.py does not make yet (used by the modality-linear tests).

``compile_sm90_deep(jobs)`` compiles like ``sm90.compile_sm90_many`` (same job dicts, same launch
specialisations) and returns, per job, sm90's resource report plus what that report misses:

    ttgir            the TritonGPU IR after Triton's passes (shared-memory buffers, async ops)
    ptxas_log        everything ptxas printed for the kernel's PTX (``-v``), warnings included
    ptxas_warnings   the lines of that log that are warnings or coded notes (e.g. "(C7515) ...")
    wgmma_serialized True when ptxas says it serialised wgmma (warning C7515 / "wgmma ... serialized")
    hgmma_shapes     sorted distinct HGMMA shapes in the SASS, e.g. ["64x128x16"]
    smem_operands    ``shared_operands(ttgir)`` (see there): per async-wgmma shared operand, its buffers

NOTE for the merge: helper ``tattn`` adds ptxas-warning capture, HGMMA shapes and a TTGIR
buffers-vs-stages check to tests/sm90.py on its branch; once both are in, this module should be
folded into those equivalents (same facts, one home).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_HERE)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import sm90  # noqa: E402

_HGMMA_RE = re.compile(r"HGMMA\.(\d+x\d+x\d+)")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_log(ptx: str) -> str:
    """Run the wheel's ptxas on the PTX with the flags Triton uses, return its stderr+stdout."""
    arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", f"--gpu-name={arch}", src, "-o",
                               os.path.join(tmp, "k.o")], capture_output=True, text=True)
    return proc.stdout + proc.stderr


def _sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_tool("cuobjdump"), "--dump-sass", path], capture_output=True, text=True,
                              check=True).stdout


_DEF_RE = re.compile(r"^\s*(%[\w#]+)(?::\d+)? = (ttg\.\w+|ttng\.\w+)\b(.*)$")
_NAME_RE = re.compile(r"%[\w#]+")


def shared_operands(ttgir: str) -> List[Dict[str, Any]]:
    """Shared-memory operands of every asynchronous warpgroup MMA, with the buffers behind each.

    Each operand of a ``ttng.warp_group_dot ... isAsync = true`` is traced back (through
    ``memdesc_index`` / ``memdesc_trans`` / other memdesc views, using the latest definition of a
    name before its use, as MLIR scopes names per region) to its ``ttg.local_alloc``. The buffers
    are the alloc's leading dim when it has one more dim than the operand (``3x128x64`` behind a
    ``128x64`` operand is 3 buffers), else 1. ``copy_target`` says whether an async copy (cp.async
    or TMA) writes into that alloc, ``pendings`` is the ``warp_group_dot_wait`` count that follows.
    Returns ``[{"shape": "128x64", "buffers": n, "copy_target": bool, "pendings": p}, ...]``.
    """
    parent: Dict[str, str] = {}
    alloc_dims: Dict[str, List[str]] = {}
    alloc_id: Dict[str, int] = {}
    copy_targets = set()
    dots = []
    lines = ttgir.splitlines()

    def root(name):
        for _ in range(64):
            if name not in parent:
                break
            name = parent[name]
        return name

    for i, line in enumerate(lines):
        m = _DEF_RE.match(line)
        if "copy_global_to_local" in line:
            for name in _NAME_RE.findall(line.split("=", 1)[-1]):
                r = root(name)
                if r in alloc_id:
                    copy_targets.add(alloc_id[r])
        if not m:
            continue
        name, op, rest = m.groups()
        for k in [k for k in parent if k == name]:
            del parent[k]
        alloc_id.pop(name, None)
        if op == "ttg.local_alloc":
            dm = re.search(r"!ttg\.memdesc<([0-9x]+)x\w+,", rest.split("->")[-1])
            if dm:
                alloc_dims[name] = dm.group(1).split("x")
                alloc_id[name] = i
        elif op.startswith("ttg.memdesc_") or op == "ttng.memdesc_trans":
            src = _NAME_RE.search(rest)
            if src:
                parent[name] = src.group(0)
        elif op == "ttng.warp_group_dot" and "isAsync = true" in rest:
            ops = _NAME_RE.findall(rest)[:2]
            shapes = re.findall(r"!ttg\.memdesc<([0-9x]+)x\w+,", rest.rsplit(" : ", 1)[-1])
            pendings = None
            for later in lines[i + 1:i + 6]:
                if "warp_group_dot_wait" in later:
                    pm = re.search(r"pendings = (\d+)", later)
                    pendings = int(pm.group(1)) if pm else None
                    break
            for operand, shape in zip(ops, shapes):
                r = root(operand)
                dims = alloc_dims.get(r) if r in alloc_id else None
                if dims is None:
                    dots.append({"shape": shape, "buffers": 0, "copy_target": False, "pendings": pendings,
                                 "_alloc": None})
                    continue
                bufs = int(dims[0]) if len(dims) == len(shape.split("x")) + 1 else 1
                dots.append({"shape": shape, "buffers": bufs, "pendings": pendings, "_alloc": alloc_id[r]})
    for d in dots:
        d["copy_target"] = d.pop("_alloc") in copy_targets
    return dots


def _compile_deep(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16=()) -> Dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = sm90._unwrap(kernel)
    constexprs = dict(constexprs or {})
    signature = dict(signature)
    for name in constexprs:
        signature.setdefault(name, "constexpr")
    signature = {a: signature[a] for a in jit_fn.arg_names}
    attrs = {(jit_fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}
    compiled = triton.compile(ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages, "num_ctas": 1})
    info = sm90._resource_usage(compiled.asm["cubin"])  # the same report as sm90.compile_sm90
    usage = info["usage"]
    local = usage["LOCAL"] + usage["STACK"]
    triton_shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    res = dict(name=info["name"] or jit_fn.__name__, registers=usage["REG"], local_bytes=local,
               stack_bytes=usage["STACK"], shared_bytes=usage["SHARED"], triton_shared=triton_shared,
               shared_total=usage["SHARED"] + triton_shared, local_insts=info["local_insts"],
               spilled=local > 0 or info["local_insts"] > 0, num_warps=num_warps, num_stages=num_stages,
               hgmma=info["hgmma"], ptxas_info=info["resource_text"])
    ttgir = compiled.asm["ttgir"]
    log = _ptxas_log(compiled.asm["ptx"])
    # ptxas prints performance warnings such as C7515 as "ptxas info : (C7515) Potential Performance Loss"
    warnings = [ln.strip() for ln in log.splitlines() if "warning" in ln.lower() or re.search(r"\(C\d{4}\)", ln)]
    sass = _sass(compiled.asm["cubin"])
    res.update(
        ttgir=ttgir,
        ptxas_log=log,
        ptxas_warnings=warnings,
        wgmma_serialized=any("C7515" in w or ("wgmma" in w and "serialized" in w) for w in warnings),
        hgmma_shapes=sorted(set(_HGMMA_RE.findall(sass))),
        smem_operands=shared_operands(ttgir),
    )
    return res


def _subprocess_main():
    import importlib
    import traceback

    out = []
    for job in json.loads(sys.stdin.read()):
        try:
            kernel = getattr(importlib.import_module(job["module"]), job["name"])
            out.append(_compile_deep(kernel, job["signature"], job["constexprs"], job["num_warps"],
                                     job["num_stages"], job["divisible_by_16"]))
        except Exception:
            out.append({"kernel": f"{job['module']}.{job['name']}", "error": traceback.format_exc()})
    sys.stdout.write("@@SM90_RESULTS@@" + json.dumps(out))


def compile_sm90_deep(jobs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``sm90.compile_sm90_many`` plus TTGIR, ptxas warnings and HGMMA shapes (module doc)."""
    payload = []
    for job in jobs:
        module, name = sm90._kernel_address(job["kernel"])
        payload.append(dict(module=module, name=name, signature=dict(job["signature"]),
                            constexprs={k: sm90._jsonable(v) for k, v in dict(job.get("constexprs") or {}).items()},
                            num_warps=int(job["num_warps"]), num_stages=int(job["num_stages"]),
                            divisible_by_16=list(job.get("divisible_by_16") or ())))
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, _HERE, env.get("PYTHONPATH", "")) if p)
    workers = max(1, min(len(payload), int(os.environ.get("SM90_COMPILE_WORKERS", os.cpu_count() or 1))))
    chunks = [list(range(i, len(payload), workers)) for i in range(workers)]

    def run_chunk(indices):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps([payload[i] for i in indices]),
                              capture_output=True, text=True, env=env, cwd=_REPO_ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"compile_sm90_deep subprocess failed (rc={proc.returncode}):\n{proc.stderr[-8000:]}")
        marker = "@@SM90_RESULTS@@"
        return json.loads(proc.stdout[proc.stdout.rindex(marker) + len(marker):])

    from concurrent.futures import ThreadPoolExecutor

    results: List[Dict[str, Any]] = [None] * len(payload)  # type: ignore[list-item]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for indices, chunk in zip(chunks, pool.map(run_chunk, chunks)):
            for i, r in zip(indices, chunk):
                results[i] = r
    for r in results:
        if "error" in r:
            raise RuntimeError(f"compile_sm90_deep: compiling {r['kernel']} failed:\n{r['error']}")
    return results


if __name__ == "__main__":
    _subprocess_main()
