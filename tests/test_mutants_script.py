"""scripts/mutants.py stays runnable: it parses, lists its mutants, and every mutant names its bug and tests.

(Running the mutants themselves takes minutes: `python scripts/mutants.py [--quick]`, outside this suite.)
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "mutants.py")


def test_mutants_script_lists_its_mutants():
    res = subprocess.run([sys.executable, SCRIPT, "--list"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    count = int(last.split()[0])
    assert count >= 20, last
    for survivor in ("trainer-scheduler-not-restored", "trainer-rng-not-restored",
                     "model-generate-decode-positions-ignore-padding"):  # the three survivors of issue 17
        assert survivor in res.stdout
    quick = subprocess.run([sys.executable, SCRIPT, "--list", "--quick"], capture_output=True, text=True, timeout=60,
                           cwd=REPO)
    assert quick.returncode == 0 and 0 < int(quick.stdout.strip().splitlines()[-1].split()[0]) < count


def test_every_mutant_names_a_bug_and_existing_test_files():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import mutants
    finally:
        sys.path.pop(0)
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names))
    for m in mutants.MUTANTS:
        assert m.bug and m.original != m.replacement, m.name
        assert os.path.exists(os.path.join(REPO, m.file)), m.name
        files = [a.split("::")[0] for a in m.tests.split() if a.startswith("tests/")]
        assert files and all(os.path.exists(os.path.join(REPO, f)) for f in files), (m.name, m.tests)
