"""Mutation testing of the algorithm core with mutmut (slow: not in CI, not in pytest).

    pip install -e ".[dev,mutation]"
    python scripts/mutation.py run                      # every module, unchecked mutants
    python scripts/mutation.py run fusion decoding      # some modules
    python scripts/mutation.py run --all fusion         # re-test every mutant of fusion
    python scripts/mutation.py run --survivors          # re-test the survivors (after new tests)
    python scripts/mutation.py report [--markdown]      # score per module, survivors

mutmut 3 copies ``src/`` into ``mutants/``, plants every mutant behind a switch, records once
which tests call which function, then runs each mutant in a forked worker on the tests that
call the mutated function. This script narrows that set further to the module's own test
files (``MODULES`` below): a module's tests must catch its bugs by themselves, and a mutant
costs only its own tests, which keeps a full run within reach of 2 cores. The configuration
(source, the test files, fork server) is ``[tool.mutmut]`` in pyproject.toml.

Survivors reviewed as equivalent (or as a change no test can observe on this machine) are
listed in ``scripts/mutation_reviewed.toml`` with a one-line reason, keyed by function and
mutated line, so a re-run flags only new survivors. Score = (killed + timeout) / (mutants -
skipped), mutmut's own definition.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pinet_lightning"
# Module (its path under the package) -> its own test files (file-name globs; the tests
# mirror the stage packages: tests/<stage>/test_<module>*.py). Order: the run order.
MODULES: dict[str, tuple[str, ...]] = {
    "inference.fusion": ("test_fusion*.py",),
    "codec.conventions": ("test_conventions*.py",),
    "inference.decoding": ("test_decoding*.py",),
    "evaluation.coco": ("test_evaluation*.py",),
    "model.refinement": ("test_heads_refinement.py", "test_refinement*.py"),
    "data.augmentation": ("test_augmentation*.py",),
    "core.images": ("test_images*.py", "test_augmentation*.py", "test_datasets_checks.py"),
    "codec.targets": ("test_targets*.py", "test_sparse.py"),
    "codec.batch": ("test_sparse.py", "test_targets*.py", "test_batch*.py"),
    "codec.codec": ("test_codec*.py",),
    "training.losses": ("test_losses*.py", "test_sparse.py"),
    "training.proposals": ("test_proposals*.py", "test_sparse.py"),
    "data.datasets": ("test_datasets*.py", "test_annotations.py"),
}
SHORT = {module.rsplit(".", 1)[1]: module for module in MODULES}  # `run fusion` works too
REVIEWED = ROOT / "scripts" / "mutation_reviewed.toml"
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
          34: "skipped", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
          255: "timeout", -11: "segfault", -9: "segfault", None: "not checked"}


def _module_of(name: str) -> str:
    """'pinet_lightning.inference.fusion.x_oks_matrix__mutmut_3' -> 'inference.fusion'."""
    return ".".join(name.split(".")[1:3])


def _module_path(module: str) -> Path:
    """'inference.fusion' -> src/pinet_lightning/inference/fusion.py (relative)."""
    return Path("src") / PACKAGE / (module.replace(".", "/") + ".py")


def _own_test(module: str, test_id: str) -> bool:
    file = Path(test_id.split("::")[0]).name
    return any(fnmatch.fnmatch(file, g) for g in MODULES[module])


def _results() -> dict[str, int | None]:
    """Exit code of every generated mutant of the target modules (empty before a run)."""
    out: dict[str, int | None] = {}
    for module in MODULES:
        meta = ROOT / "mutants" / _module_path(module).with_suffix(".py.meta")
        if meta.is_file():
            out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def _install_own_test_filter() -> None:
    """After mutmut has collected (or loaded) which tests call which function, keep only
    the tests in the function's own module's test files."""
    import mutmut.__main__ as mm
    from mutmut.state import state

    collect = mm.collect_or_load_stats

    def collect_then_narrow(*args, **kwargs):
        collect(*args, **kwargs)
        table = state().tests_by_mangled_function_name
        for function, tests in table.items():
            if function.startswith(PACKAGE + ".") and _module_of(function) in MODULES:
                table[function] = {t for t in tests if _own_test(_module_of(function), t)}

    mm.collect_or_load_stats = collect_then_narrow


def _check_config() -> None:
    """pyproject's test selection must name the MODULES globs (one list, two places)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    args = cfg["pytest_add_cli_args_test_selection"]
    files = next(a for a in args if a.startswith("python_files=")).split("=", 1)[1].split()
    wanted = sorted({g for globs in MODULES.values() for g in globs})
    if sorted(set(files)) != wanted:
        raise SystemExit(f"pyproject [tool.mutmut] python_files {files} differ from "
                         f"scripts/mutation.py MODULES {wanted}: make them equal")
    sources = {".".join(Path(f).relative_to(Path("src") / PACKAGE).with_suffix("").parts)
               for f in cfg["only_mutate"]}
    if sources != set(MODULES):
        raise SystemExit(f"pyproject [tool.mutmut] only_mutate {sorted(sources)} differ from "
                         f"scripts/mutation.py MODULES {sorted(MODULES)}")


def _config_changed() -> bool:
    """Whether mutmut will void every result (its test selection or pytest arguments
    changed since the last run): then every mutant needs a run, not just the unchecked."""
    stats = ROOT / "mutants" / "mutmut-stats.json"
    if not stats.is_file():
        return False
    from mutmut.configuration import config

    old = json.loads(stats.read_text()).get("config_fingerprint", {})
    new = config().config_fingerprint()
    return any(old.get(g) != new[g] for g in ("test_execution", "test_selection"))


def run(modules: list[str], which: str, jobs: int) -> None:
    _check_config()
    os.chdir(ROOT)
    if which != "all" and _config_changed():
        print("mutmut's test selection or pytest arguments changed: every mutant is re-run")
        which = "all"
    results = _results()
    names: list[str] = []
    for module in modules:
        mine = {k: v for k, v in results.items() if _module_of(k) == module}
        if which == "all" or not mine:
            names.append(f"{PACKAGE}.{module}.*")
        elif which == "survivors":  # and those no test reached
            names += [k for k, v in mine.items() if v in (0, 5, 33)]
        else:
            names += [k for k, v in mine.items() if v is None]
    if not names:
        print("nothing to test: every selected mutant has a result (see --all, --survivors)")
        return
    _install_own_test_filter()
    # one torch thread a worker: --jobs workers share the cores without oversubscribing them
    os.environ["PINET_TEST_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    import mutmut.__main__ as mm

    os.chdir(ROOT)
    mm.cli(["run", "--max-children", str(jobs), *names], standalone_mode=False)


def _reviewed() -> dict[tuple[str, str], str]:
    if not REVIEWED.is_file():
        return {}
    data = tomllib.loads(REVIEWED.read_text())
    return {(e["function"], e["mutant"]): e["reason"] for e in data.get("survivor", [])}


def _diff_key(name: str) -> tuple[str, str]:
    """(function, mutated lines): a key that survives the renumbering of mutants."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    os.chdir(ROOT)
    path = _module_path(_module_of(name))
    diff = get_diff_for_mutant(name, path=path)
    plus = [ln[1:].strip() for ln in diff.splitlines()
            if ln.startswith("+") and not ln.startswith("+++")]
    return name.split("__mutmut_")[0].removeprefix(PACKAGE + "."), " / ".join(plus)


def report(markdown: bool) -> int:
    results = _results()
    if not results:
        print("no results yet: run `python scripts/mutation.py run` first")
        return 1
    reviewed = _reviewed()
    rows, survivors = [], []
    total = Counter()
    for module in MODULES:
        c = Counter(STATUS.get(v, "suspicious") for k, v in results.items()
                    if _module_of(k) == module)
        if not c:
            continue
        total += c
        rows.append((module, c))
        survivors += sorted((k for k, v in results.items()
                             if _module_of(k) == module and v == 0),
                            key=lambda k: (k.split("__mutmut_")[0], int(k.split("_")[-1])))
    rows.append(("total", total))

    def score(c: Counter) -> float:
        tested = sum(c.values()) - c["skipped"] - c["not checked"]
        return 100.0 * (c["killed"] + c["timeout"]) / max(tested, 1)

    head = ("module", "mutants", "killed", "timeout", "survived", "no tests", "other",
            "not run", "score")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for module, c in rows:
        named = ("killed", "timeout", "survived", "no tests", "not checked")
        other = sum(c.values()) - sum(c[n] for n in named)
        lines.append(f"| {module} | {sum(c.values())} | {c['killed']} | {c['timeout']} | "
                     f"{c['survived']} | {c['no tests']} | {other} | {c['not checked']} | "
                     f"{score(c):.1f}% |")
    print("\n".join(lines) if markdown else "\n".join(ln.replace("|", " ") for ln in lines))
    print()
    new = 0
    if markdown:
        print("| mutant | mutated code | reason |\n|---|---|---|")
    for name in survivors:
        key = _diff_key(name)
        reason = reviewed.get(key)
        new += reason is None
        short = name.removeprefix(PACKAGE + ".")
        if markdown:
            code = key[1].replace("|", "\\|")
            print(f"| `{short}` | `{code}` | {reason or '**not reviewed**'} |")
        else:
            print(f"{'   ' if reason else 'NEW'} {short}: {key[1]}\n      {reason or ''}")
    if not markdown:
        print(f"\nscore {score(total):.1f}% over {', '.join(m for m, _ in rows[:-1])}; "
              f"{len(survivors)} survivors, {new} not reviewed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run mutmut on the modules (default: all, in order)")
    r.add_argument("modules", nargs="*", help=f"some of {', '.join(MODULES)}")
    group = r.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="re-test every mutant")
    group.add_argument("--survivors", action="store_true",
                       help="re-test the survivors and the mutants no test reached")
    r.add_argument("--jobs", type=int, default=2, help="parallel workers (default 2)")
    p = sub.add_parser("report", help="score per module and the survivors")
    p.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "run":
        modules = [SHORT.get(m, m) for m in args.modules]
        unknown = sorted(set(modules) - set(MODULES))
        if unknown:
            parser.error(f"unknown modules {unknown}; choose from {', '.join(MODULES)}")
        which = "all" if args.all else "survivors" if args.survivors else "unchecked"
        run(modules or list(MODULES), which, args.jobs)
        return 0
    return report(args.markdown)


if __name__ == "__main__":
    sys.exit(main())
