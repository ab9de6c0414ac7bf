"""scripts/mutate.py (mutation testing, not run in CI) is kept usable by CI: every mutant's original
snippet occurs exactly once in today's sources (so a kernel change that breaks one fails here and the
list is updated with it), the list spans the kernels and the launch layer, and planting, running and
restoring work, checked on a trivial mutant with a stand-in test command instead of the suite, and
one cheap listed mutant is killed by its own test."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_mutate():
    spec = importlib.util.spec_from_file_location("ca_mutate", ROOT / "scripts" / "mutate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


mutate = _load_mutate()


def test_every_snippet_occurs_exactly_once_in_todays_sources():
    problems = mutate.check_mutants(ROOT)
    assert not problems, "scripts/mutate.py is out of sync with the sources:\n" + "\n".join(problems)


def test_the_list_spans_kernels_and_launch_layer():
    files = {m.file for m in mutate.MUTANTS}
    assert len(mutate.MUTANTS) >= 40
    assert {"cuda_src/forward.cu", "cuda_src/backward.cu", "cuda_src/norm.cu", "cuda_src/common.cuh"} <= files
    assert any(f.startswith("cupy_cosattn/launch/") for f in files)
    for m in mutate.MUTANTS:
        assert m.tests and m.rationale and m.original != m.replacement, m.id
        assert any(a.startswith("tests/") for a in m.tests), f"{m.id}: no test file in its selection"


def test_check_reports_missing_and_repeated_snippets(tmp_path):
    (tmp_path / "a.cu").write_text("x = 1;\ny = 2;\ny = 2;\n")
    gone = mutate.Mutant("gone", "a.cu", "z = 3;", "z = 4;", ("tests/t.py",), "r")
    twice = mutate.Mutant("twice", "a.cu", "y = 2;", "y = 3;", ("tests/t.py",), "r")
    once = mutate.Mutant("once", "a.cu", "x = 1;", "x = 0;", ("tests/t.py",), "r")
    assert "occurs 0 times" in mutate.check_mutant(tmp_path, gone)
    assert "occurs 2 times" in mutate.check_mutant(tmp_path, twice)
    assert mutate.check_mutant(tmp_path, once) is None
    with pytest.raises(mutate.MutantError, match="occurs 2 times"):
        mutate.plant(tmp_path, twice)
    assert (tmp_path / "a.cu").read_text() == "x = 1;\ny = 2;\ny = 2;\n"  # nothing written


def test_plant_run_restore_on_a_trivial_mutant(tmp_path):
    """In a scratch copy of the repository: the test command sees the planted mutant, the file is
    restored byte for byte afterwards, and the exit status decides killed / survived / hang."""
    root = mutate.copy_repo(tmp_path / "tree", ROOT)
    assert (root / "scripts" / "mutate.py").is_file() and not (root / ".git").exists()
    m = mutate.MUTANTS[0]
    before = (root / m.file).read_bytes()
    env = mutate.scratch_env(root, tmp_path / "cache", None)
    # The stand-in "suite" fails exactly when the mutant is in place (as a test that catches it would).
    probe = [sys.executable, "-c", f"import sys; t = open({str(root / m.file)!r}).read(); "
             f"sys.exit(1 if {m.replacement!r} in t and {m.original!r} not in t else 0)"]
    killed = mutate.run_mutant(root, m, env, 60, command=lambda _: probe)
    assert killed.status == "killed" and killed.killed
    assert (root / m.file).read_bytes() == before

    # A suite that passes whatever the source: the mutant survives.
    ok = mutate.run_mutant(root, m, env, 60, command=lambda _: [sys.executable, "-c", "pass"])
    assert ok.status == "survived" and not ok.killed
    # A hanging suite is stopped at the timeout and counts as a kill.
    hang = mutate.run_mutant(root, m, env, 2, command=lambda _: [sys.executable, "-c", "import time; time.sleep(60)"])
    assert hang.status == "timeout" and hang.killed and hang.seconds < 30
    assert (root / m.file).read_bytes() == before

    summary = mutate.summarize([m, m], [killed, ok])
    assert summary["killed"] == 1 and summary["judged"] == 2 and [s["id"] for s in summary["survivors"]] == [m.id]


def test_scratch_env_imports_the_scratch_package(tmp_path):
    root = mutate.copy_repo(tmp_path / "tree", ROOT)
    env = mutate.scratch_env(root, tmp_path / "cache", 1)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(root) and env["CUPY_COSATTN_EMU_THREADS"] == "1"
    mutate.check_import_location(root, env)  # raises SystemExit otherwise


def test_a_listed_mutant_is_killed_by_its_tests(monkeypatch):
    """End to end on one cheap mutant of the list: norm.cu without its eps clamp, planted through the
    launch layer (tests/planting.py), fails the norm test its selection names, which passes without it."""
    import test_kernels_forward
    from planting import plant

    m = next(m for m in mutate.MUTANTS if m.id == "norm_eps_fwd")
    assert m.file == "cuda_src/norm.cu" and any("l2norm" in a for a in m.tests)
    case = ("float32", 64, 1)  # a zero row and a chunk below eps among its rows
    test_kernels_forward.test_l2norm_forward(*case)
    plant(monkeypatch, "norm.cu", m.original, m.replacement)
    with pytest.raises(AssertionError):
        test_kernels_forward.test_l2norm_forward(*case)
