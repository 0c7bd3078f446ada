"""Fault injection: kill -9 a tiny training run (1 process, or torchrun with its 2 gloo workers) at random
moments, including during checkpoint writes, resume with --resume auto until done, and compare every step
loss with an uninterrupted run. Linux (reads /proc). Minutes on a 2-core CPU.

    python scripts/fault_inject_resume.py single|ddp|fsdp [SEED] [OUT_BASE]     # KILLS=4 by default
"""
import json, os, random, signal, subprocess, sys, time, shutil
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
mode = sys.argv[1]
base = os.path.abspath(os.path.join(sys.argv[3] if len(sys.argv) > 3 else "runs/fault_inject", mode))
shutil.rmtree(base, ignore_errors=True)
def cmd(out, extra):
    c = ["train", "--tiny", "--stage", "2", "--max-steps", "12", "--num-samples", "16", "--no-progress",
         "--save-every", "1", "--output-dir", out] + extra
    if mode == "single":
        return [sys.executable, "-m", "llavit_kernels.train"] + c + ["--batch-size", "4"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "llavit_kernels.train"] + c + ["--batch-size", "2", "--parallel", mode]
def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(st.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out
subprocess.run(cmd(base + "/straight", []), env=env, cwd=REPO, capture_output=True, check=True)
random.seed(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
out = base + "/faulty"
kills = 0
while True:
    p = subprocess.Popen(cmd(out, ["--resume", "auto"]), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kills < int(os.environ.get("KILLS", "4")):
        logf = out + "/log.jsonl"
        n0 = len(open(logf).readlines()) if os.path.exists(logf) else 0
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < 300:
            n = len(open(logf).readlines()) if os.path.exists(logf) else 0
            if n > n0:
                break
            time.sleep(0.05)
        time.sleep(random.uniform(0, 1.0))
        if p.poll() is None:
            victims = [p.pid] + children(p.pid)
            for v in victims:
                try: os.kill(v, signal.SIGKILL)
                except OSError: pass
            kills += 1
            print("killed", victims, "ckpts", sorted(d for d in os.listdir(out)) if os.path.isdir(out) else None, flush=True)
        p.wait()
        continue
    _, err = p.communicate()
    print("final rc", p.returncode, err[-500:] if p.returncode else "")
    break
a = [json.loads(l) for l in open(base + "/straight/log.jsonl")]
b = [json.loads(l) for l in open(out + "/log.jsonl")]
print("straight", [r["loss"] for r in a])
print("faulty  ", [r["loss"] for r in b])
exact = [r["loss"] for r in a] == [r["loss"] for r in b] and [r["step"] for r in b] == list(range(1, 13))
print("EXACT" if exact else "DIFFERENT")
sys.exit(0 if exact else 1)
