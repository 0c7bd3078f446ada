#!/usr/bin/env python3
"""Mutant suite: do the tests catch the bugs they exist for?

Each mutant below is one realistic one-line bug (file, the exact original snippet, its replacement,
the bug it stands for, and the fast test selection that must catch it). For each selected mutant
the script applies it to a temporary copy of the repository (the working tree is never modified,
even on Ctrl-C), runs its tests with ``pytest -x -q`` under a timeout, and reports KILLED (a test
failed, as it should) or SURVIVED (every test passed: a hole in the suite). Exit status: 0 when every
mutant is killed, 1 when one survived (or its tests could not run), 2 for a stale mutant (its
snippet is no longer found exactly once: re-anchor it to the current code).

    python scripts/mutants.py                 # the whole suite (minutes on 2 cores)
    python scripts/mutants.py --quick         # a short subset (what CI can afford)
    python scripts/mutants.py --only NAME     # one mutant (repeatable; a prefix selects a group: --only tattn)
    python scripts/mutants.py --list          # names, targets, tests (fast; nothing runs)
    python scripts/mutants.py --check         # every snippet found exactly once? (fast; nothing runs)
    python scripts/mutants.py --baseline ...  # first run each selection on the clean copy (must pass)

When a real bug is fixed, add its mutant here (with the test that now catches it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file (context lines may be included to make it unique)
    replacement: str
    bug: str  # the real bug this stands for
    tests: str  # pytest arguments: files / node ids, optionally -k "..."
    quick: bool = False  # part of --quick


L = "llavit_kernels/layout.py"
REF_ATTN = "llavit_kernels/ops/span_attention.py"
REF_LIN = "llavit_kernels/ops/modality_linear.py"
TATTN = "llavit_kernels/ops/_span_attention_kernels.py"
TATTN_PY = "llavit_kernels/ops/_span_attention_triton.py"
TMOD = "llavit_kernels/ops/_modality_linear_kernels.py"
NN_ATTN = "llavit_kernels/nn/attention.py"
NN_LIN = "llavit_kernels/nn/linear.py"
HF = "llavit_kernels/integrations/transformers.py"
MODEL = "llavit_kernels/models/llavit.py"
DATA = "llavit_kernels/data/datasets.py"
TRAINER = "llavit_kernels/train/trainer.py"

T_ATTN = "tests/test_span_attention_triton.py"
T_MOD = "tests/test_modality_linear_triton.py"

MUTANTS: List[Mutant] = [
    # ------------------------------------------------------------------ layout
    Mutant("layout-packed-doc-lookup", L,
           "torch.searchsorted(cu[1:], idx, right=True)",
           "torch.searchsorted(cu[1:], idx, right=False)",
           "packed: the first token of every document is assigned to the previous document",
           "tests/test_layout_packed_bounds.py", quick=True),
    Mutant("layout-packed-images-merge-across-documents", L,
           "segment_start = idx == doc_start",
           "segment_start = torch.zeros_like(is_image)",
           "packed: an image ending one document and one starting the next form one span",
           "tests/test_layout_packed_bounds.py"),
    Mutant("layout-packed-short-cu-seqlens-accepted", L,
           "if int(cu_seqlens[-1]) != num_tokens:",
           "if int(cu_seqlens[-1]) > num_tokens:",
           "packed: cu_seqlens ending before N is accepted (the tail tokens belong to no document)",
           "tests/test_layout_packed_bounds.py"),
    Mutant("layout-left-padding-visible", L,
           "kv_start = torch.where(valid_q, vs.expand(batch, num_q), vs)",
           "kv_start = torch.where(valid_q, torch.zeros_like(vs).expand(batch, num_q), vs)",
           "padded: queries attend to the left-padding keys",
           "tests/test_layout.py -k 'left_padding or decode_step'", quick=True),
    Mutant("layout-image-misses-its-span-end", L,
           "kv_end_valid = past_length + torch.where(img, span_end, idx_q + 1)",
           "kv_end_valid = past_length + torch.where(img, span_end - 1, idx_q + 1)",
           "an image token does not see the last token of its own image",
           "tests/test_layout.py -k 'example_mask or all_image'"),
    Mutant("layout-span-ids-ignored", L,
           "continues_prev = continues_prev & (span_ids == prev_ids)",
           "continues_prev = continues_prev & (span_ids == span_ids)",
           "two adjacent images with different span ids merge into one bidirectional span",
           "tests/test_layout.py -k adjacent"),
    # ------------------------------------------------------------------ reference ops
    Mutant("ref-default-scale", REF_ATTN,
           "else 1.0 / math.sqrt(q.shape[-1])",
           "else 1.0 / q.shape[-1]",
           "reference span attention: default softmax scale 1/D instead of 1/sqrt(D)",
           "tests/test_reference_defaults.py -k reference", quick=True),
    Mutant("ref-modality-select-swapped", REF_LIN,
           "return torch.where(is_image[..., None], y_image, y_text)",
           "return torch.where(is_image[..., None], y_text, y_image)",
           "reference modality_linear: text tokens take the image weights and vice versa",
           "tests/test_reference_defaults.py -k modality_linear_reference_backend"),
    Mutant("ref-rotate-half-sign", REF_LIN,
           "return torch.cat((-x[..., half:], x[..., :half]), dim=-1)",
           "return torch.cat((x[..., half:], -x[..., :half]), dim=-1)",
           "reference RoPE: rotate-half with the sign on the wrong half (rotation by -angle)",
           "tests/test_rope_cpu.py -k reference", quick=True),
    # ------------------------------------------------------------------ Triton span attention
    Mutant("tattn-fwd-mask-end-inclusive", TATTN,
           'allowed = (cols[None, :] >= kv_lo[:, None]) & (cols[None, :] < kv_hi[:, None])\n'
           '        qk = tl.where(allowed, qk, float("-inf"))',
           'allowed = (cols[None, :] >= kv_lo[:, None]) & (cols[None, :] <= kv_hi[:, None])\n'
           '        qk = tl.where(allowed, qk, float("-inf"))',
           "forward: a query also attends to the key just past its interval (off by one at kv_end)",
           f"{T_ATTN} -k 'padded_batch_matches_reference and dtype0'"),
    Mutant("tattn-block-full-too-early", TATTN,
           "full_hi = (min_end // BLOCK) * BLOCK",
           "full_hi = ((min_end + BLOCK - 1) // BLOCK) * BLOCK",
           "block skipping: a block cut by an interval end runs unmasked (keys past kv_end attended)",
           f"{T_ATTN} -k 'padded_batch_matches_reference and dtype0'"),
    Mutant("tattn-fwd-gqa-interleaved", TATTN,
           "# heavy-first: last query blocks see the most keys\n"
           "    b = (pid_bh // H).to(tl.int64)\n"
           "    h = pid_bh % H\n"
           "    hk = h // groups",
           "# heavy-first: last query blocks see the most keys\n"
           "    b = (pid_bh // H).to(tl.int64)\n"
           "    h = pid_bh % H\n"
           "    hk = h % (H // groups)",
           "forward GQA: query head h reads KV head h % Hkv (repeat vs repeat_interleave confusion)",
           f"{T_ATTN} -k gqa_groups"),
    Mutant("tattn-lse-in-log2-units", TATTN,
           "lse = tl.where(has_keys, (m_i + tl.math.log2(safe_l)) * 0.6931471805599453, float(\"inf\"))",
           "lse = tl.where(has_keys, (m_i + tl.math.log2(safe_l)), float(\"inf\"))",
           "forward saves the log-sum-exp in log2 units: the backward recomputes wrong probabilities",
           f"{T_ATTN} -k 'padded_batch_matches_reference and dtype0'"),
    Mutant("tattn-dq-without-delta", TATTN,
           "ds = p * (dp - delta[:, None])",
           "ds = p * dp",
           "backward dQ: the softmax Jacobian's delta = rowsum(dO * O) term is dropped",
           f"{T_ATTN} -k 'padded_batch_matches_reference and dtype0'"),
    Mutant("tattn-dkdv-gqa-interleaved", TATTN,
           "h = hk * groups + g",
           "h = g * HKV + hk",
           "backward dK/dV under GQA: sums the wrong query heads into a KV head",
           f"{T_ATTN} -k gqa_groups"),
    Mutant("tattn-default-scale", TATTN_PY,
           "else 1.0 / math.sqrt(q.shape[-1])",
           "else 1.0 / q.shape[-1]",
           "Triton span attention: default softmax scale 1/D instead of 1/sqrt(D)",
           "tests/test_reference_defaults.py -k triton"),
    # ------------------------------------------------------------------ Triton modality projection
    Mutant("tmod-fwd-weight-pick", TMOD,
           "b_ptr = tl.where(is_img, bi_ptr, bt_ptr)",
           "b_ptr = tl.where(is_img, bt_ptr, bt_ptr)",
           "routed GEMM: image tiles are projected with the text weights",
           f"{T_MOD} -k 'linear_fp32_layouts and mixed'"),
    Mutant("tmod-fwd-bias-pick", TMOD,
           "        if HAS_BIAS:\n            bias_ptr = tl.where(is_img, biasi_ptr, biast_ptr)",
           "        if HAS_BIAS:\n            bias_ptr = tl.where(is_img, biast_ptr, biasi_ptr)",
           "routed GEMM epilogue: text and image biases swapped",
           f"{T_MOD} -k 'linear_fp32_layouts and mixed'"),
    Mutant("tmod-dw-drops-last-image-tile", TMOD,
           "hi = tl.where(modality == 1, n_tiles, text_tiles)\n"
           "    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
           "    cols_k = pid_k * BLOCK_K",
           "hi = tl.where(modality == 1, n_tiles - 1, text_tiles)\n"
           "    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
           "    cols_k = pid_k * BLOCK_K",
           "dW: the last image tile's tokens are left out of the image weight gradient",
           f"{T_MOD} -k 'linear_fp32_layouts and mixed'"),
    Mutant("tmod-rope-epilogue-hi-half-tables", TMOD,
           "o_lo = y_lo * c_lo - y_hi * s_lo\n                o_hi = y_hi * c_hi + y_lo * s_hi",
           "o_lo = y_lo * c_lo - y_hi * s_lo\n                o_hi = y_hi * c_lo + y_lo * s_lo",
           "fused QKV RoPE epilogue: the second half is rotated with the first half's cos / sin",
           "tests/test_rope_cpu.py -k fused", quick=True),
    Mutant("tmod-rope-rotates-v", TMOD,
           "rotate = head < num_heads + num_kv_heads",
           "rotate = head < num_heads + 2 * num_kv_heads",
           "fused QKV RoPE epilogue: v heads are rotated too",
           "tests/test_rope_cpu.py -k fused"),
    Mutant("tmod-rope-backward-sin-half", TMOD,
           "g_hi * c_hi - g_lo * s_lo",
           "g_hi * c_hi - g_lo * s_hi",
           "fused QKV RoPE backward prologue: the inverse rotation reads the wrong half of sin",
           "tests/test_rope_cpu.py -k fused"),
    # ------------------------------------------------------------------ nn
    Mutant("nn-image-qkv-not-copied-from-text", NN_ATTN,
           "image.weight.copy_(text.weight)",
           "image.weight.mul_(1.0)  # the copy from the text weights is forgotten",
           "LlavitAttention: image q/k/v keep a random init instead of copies of the text ones",
           "tests/test_nn.py -k image_init_is_copy"),
    Mutant("nn-modality-linear-image-not-copied", NN_LIN,
           "self.weight_image.copy_(self.weight)",
           "self.weight_image.mul_(1.0)  # the copy from the text weight is forgotten",
           "ModalityLinear: the image weight is not initialised from the text weight",
           "tests/test_nn.py -k from_linear_and_routing"),
    Mutant("nn-routing-ignored", NN_ATTN,
           "q, k, v = self.project_qkv(hidden_states, layout, cos, sin)",
           "q, k, v = self.project_qkv(hidden_states, torch.zeros_like(layout.is_image), cos, sin)",
           "LlavitAttention: image tokens take the text q/k/v",
           "tests/test_nn.py -k 'matches_brute_force and True-True and 4-2'"),
    Mutant("nn-bidirectional-switch-ignored", NN_ATTN,
           "mask_layout = layout if self.bidirectional_image else causal_mask_layout(layout)",
           "mask_layout = layout",
           "LlavitAttention(bidirectional_image=False) still attends bidirectionally inside images",
           "tests/test_nn.py -k 'matches_brute_force and True-False'"),
    # ------------------------------------------------------------------ integrations
    Mutant("hf-decode-layout-ignores-padding", HF,
           "SpanLayout.from_image_mask(self.is_image, mask, self.span_ids, past_length=past)",
           "SpanLayout.from_image_mask(self.is_image, mask if past == 0 else None, self.span_ids, past_length=past)",
           "converted HF model: decode steps attend to the left-padding keys in the cache",
           "tests/test_generate_padding.py -k hf"),
    Mutant("hf-image-weights-not-reloaded", HF,
           "param.copy_(value.to(param.dtype))",
           "param.mul_(1.0)  # the loaded value is dropped",
           "apply_llavit after from_pretrained keeps fresh copies instead of the trained image weights",
           "tests/test_integration_transformers.py -k save_pretrained_from_pretrained"),
    # ------------------------------------------------------------------ model
    Mutant("model-generate-decode-positions-ignore-padding", MODEL,
           "pos = pos[:, -1:] + 1",
           "pos = torch.full_like(pos[:, -1:], mask.shape[1] - 1)",
           "native generate: decode positions count the left padding (issue 17 survivor 3)",
           "tests/test_generate_padding.py -k native", quick=True),
    # ------------------------------------------------------------------ data
    Mutant("data-labels-not-shifted", DATA,
           "labels[:-1] = torch.where(nxt[:-1], input_ids_t[1:], IGNORE_INDEX)",
           "labels[:-1] = torch.where(nxt[:-1], input_ids_t[:-1], IGNORE_INDEX)",
           "labels are the current token instead of the next one (the model learns to copy)",
           "tests/test_data.py"),
    # (Not here: "packed positions do not restart per document". Under RoPE, attention inside a document
    # depends only on position differences, so that mutant is equivalent up to rounding: no test can kill it.)
    Mutant("data-padding-trained", DATA,
           "labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)",
           "labels = torch.full((B, T), pad_token_id, dtype=torch.long)",
           "padded batches: the loss also trains the model to predict padding",
           "tests/test_data.py -k padding_and_packing"),
    Mutant("data-image-tokens-are-targets", DATA,
           "targets.extend([False] * self.num_image_tokens)",
           "targets.extend([True] * self.num_image_tokens)",
           "the image placeholder tokens become answer targets (the loss covers image positions)",
           "tests/test_data.py"),
    # ------------------------------------------------------------------ trainer
    Mutant("trainer-scheduler-not-restored", TRAINER,
           'scheduler.load_state_dict(blob["scheduler"])',
           "pass  # the LR schedule restarts on resume",
           "resume: the LR scheduler is not restored (issue 17 survivor 1)",
           "tests/test_resume_exact.py -k lr", quick=True),
    Mutant("trainer-rng-not-restored", TRAINER,
           '_set_rng_state(blob["rng"])',
           "pass  # the global RNG is not restored",
           "resume: the global RNGs are not restored (issue 17 survivor 2)",
           "tests/test_resume_exact.py -k rng", quick=True),
    Mutant("trainer-loader-draws-from-global-rng", TRAINER,
           "generator=torch.Generator().manual_seed(cfg.seed))",
           "generator=None)",
           "resume: the DataLoader's seed draw advances the restored global torch generator",
           "tests/test_resume_exact.py -k rng"),
    Mutant("trainer-stage1-trains-the-llm", TRAINER,
           '1: [r"^projector\\.", r"_proj_image\\."],',
           '1: [r"^projector\\.", r"_proj_image\\.", r"^language_model\\."],',
           "stage 1 also trains the LLM (LLaVA-1.5 freezes it)",
           "tests/test_train.py -k stage1"),
]


# ---------------------------------------------------------------------------------------- helpers
def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def stale_reason(m: Mutant, root: str = REPO) -> Optional[str]:
    path = os.path.join(root, m.file)
    if not os.path.exists(path):
        return f"{m.file} does not exist"
    n = _read(path).count(m.original)
    if n != 1:
        return f"snippet found {n} times in {m.file} (expected exactly once): {m.original.splitlines()[0]!r}"
    if m.original == m.replacement:
        return "replacement equals the original"
    return None


def _repo_files(root: str) -> List[str]:
    """Tracked and untracked-but-not-ignored files (what a checkout would have)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, check=True,
                             capture_output=True).stdout
        files = [f for f in out.decode().split("\0") if f]
        return [f for f in files if os.path.isfile(os.path.join(root, f))]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "venv", "runs", "outputs", "build", "dist", "__pycache__", ".pytest_cache",
                ".hypothesis", ".benchmarks"}
        files = []
        for d, dirs, names in os.walk(root):
            dirs[:] = [x for x in dirs if x not in skip and not x.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(d, n), root) for n in names]
        return files


def copy_repo(dst: str) -> None:
    for rel in _repo_files(REPO):
        target = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), target)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_tests(copy: str, tests: str, timeout: float, env: dict):
    """(return code or None on timeout, seconds, output) of ``pytest -x -q <tests>`` in the copy."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header"] + shlex.split(tests)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: a timeout kills all of it
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, time.perf_counter() - t0, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        _kill(proc)
        return None, time.perf_counter() - t0, ""
    except BaseException:
        _kill(proc)
        raise


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:160]
    lines = [x for x in output.splitlines() if x.strip()]
    return lines[-1][:160] if lines else ""


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the mutants (name, file, tests, bug) and exit")
    p.add_argument("--check", action="store_true", help="check that every snippet is found exactly once, and exit")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run this mutant (exact name, or a prefix such as 'tattn-'); repeatable")
    p.add_argument("--quick", action="store_true", help="only the short subset marked quick (for CI)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's test run (default 600)")
    p.add_argument("--baseline", action="store_true",
                   help="first run each selected mutant's tests on the unmutated copy (they must pass)")
    args = p.parse_args(argv)

    names = [m.name for m in MUTANTS]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        print(f"duplicate mutant names: {sorted(dupes)}", file=sys.stderr)
        return 2
    selected = [m for m in MUTANTS if not args.quick or m.quick]
    if args.only:
        unknown = [o for o in args.only if not any(m.name == o or m.name.startswith(o) for m in MUTANTS)]
        if unknown:
            print(f"--only: no mutant named (or starting with) {unknown}; see --list", file=sys.stderr)
            return 2
        selected = [m for m in selected if any(m.name == o or m.name.startswith(o) for o in args.only)]

    if args.list:
        for m in selected:
            flag = " [quick]" if m.quick else ""
            print(f"{m.name}{flag}\n    {m.file}: {m.bug}\n    tests: {m.tests}")
        print(f"{len(selected)} mutants ({sum(m.quick for m in selected)} in --quick)")
        return 0

    stale = [(m, r) for m in selected if (r := stale_reason(m))]
    for m, r in stale:
        print(f"STALE MUTANT {m.name}: {r}", file=sys.stderr)
    if stale:
        print(f"{len(stale)} stale mutant(s): re-anchor them to the current code (scripts/mutants.py)", file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(selected)} mutants, every snippet found exactly once")
        return 0

    def on_sigterm(signum, frame):  # like Ctrl-C: the temporary copy is removed and the child group killed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    tmp = tempfile.mkdtemp(prefix="llavit-mutants-")
    results = []
    t_start = time.perf_counter()
    try:
        copy_repo(tmp)
        env = dict(os.environ)
        env["PYTHONPATH"] = tmp + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # a same-size mutant within the same second must not hit a stale .pyc
        where = subprocess.run([sys.executable, "-c", "import llavit_kernels; print(llavit_kernels.__file__)"],
                               cwd=tmp, env=env, capture_output=True, text=True)
        if not where.stdout.strip().startswith(os.path.realpath(tmp)) and not where.stdout.strip().startswith(tmp):
            print(f"the copy's llavit_kernels is not the one imported ({where.stdout.strip() or where.stderr[-500:]})",
                  file=sys.stderr)
            return 2
        print(f"{len(selected)} mutants on a copy in {tmp}; pytest -x -q per mutant, timeout {args.timeout:.0f} s",
              flush=True)
        for i, m in enumerate(selected, 1):
            path = os.path.join(tmp, m.file)
            clean = _read(path)
            if args.baseline:
                rc, secs, out = run_tests(tmp, m.tests, args.timeout, env)
                if rc != 0:
                    status = "BASELINE-FAILS" if rc is not None else "BASELINE-TIMEOUT"
                    results.append((m, status, secs, _first_failure(out)))
                    print(f"[{i}/{len(selected)}] {status:<9} {m.name} ({secs:.0f} s) {_first_failure(out)}", flush=True)
                    continue
            with open(path, "w", encoding="utf-8") as f:
                f.write(clean.replace(m.original, m.replacement, 1))
            try:
                rc, secs, out = run_tests(tmp, m.tests, args.timeout, env)
            finally:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(clean)
            if rc is None:
                status, detail = "KILLED", f"(timeout after {secs:.0f} s)"
            elif rc in (1, 2, 3):  # tests failed / collection or import error / internal error
                status, detail = "KILLED", _first_failure(out)
            elif rc == 0:
                status, detail = "SURVIVED", ""
            else:  # 4 usage error, 5 no tests collected: the selection itself is broken
                status, detail = "NO-TESTS", f"pytest exit {rc}: {_first_failure(out)}"
            results.append((m, status, secs, detail))
            print(f"[{i}/{len(selected)}] {status:<8} {m.name} ({secs:.0f} s) {detail}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: the working tree was never modified; the temporary copy is removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    total = time.perf_counter() - t_start
    killed = sum(1 for r in results if r[1] == "KILLED")
    bad = [r for r in results if r[1] != "KILLED"]
    print(f"\n{killed}/{len(results)} killed, {len(bad)} not killed, {total:.0f} s")
    for m, status, _, detail in bad:
        print(f"  {status}: {m.name} ({m.file}): {m.bug}\n      tests: {m.tests} {detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
