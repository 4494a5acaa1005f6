"""The README's "Every bad input and fault, with its test" table cannot rot: every test it names exists (found
by parsing the test files with `ast`, parametrized ids included), its rows are numbered 1..N, it lists at least
40 distinct bad inputs over spec, data and storage, and the count line under it says what the table holds."""

from __future__ import annotations

import ast
import re
from collections import Counter
from functools import cache

from tests.conftest import ROOT

SECTION = "### Every bad input and fault, with its test"
COLUMNS = ["#", "area", "bad input or fault", "what the user gets", "test"]
AREAS = ("spec", "data", "storage", "fault", "operations")
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^`]*)\])?`")
COUNTS = re.compile(r"^(\d+) bad inputs: (\d+) spec, (\d+) data, (\d+) storage; (\d+) faults; (\d+) operational errors")
UNKNOWN = None  # ids that cannot be worked out from the source (values from a variable or a call)


def _section() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(SECTION) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return lines[start:end]


def _rows() -> list[list[str]]:
    table = [line for line in _section() if line.startswith("|")]
    header, rule, *rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table]
    assert header == COLUMNS and all(set(cell) <= {"-", ":"} for cell in rule)
    assert all(len(row) == len(COLUMNS) for row in rows), [row[0] for row in rows if len(row) != len(COLUMNS)]
    return rows


# ---------------------------------------------------------------------------- test names and ids, from source


def _value_id(node: ast.expr, argname: str, index: int) -> str | None:
    """pytest's id for one parameter value (`_idval`): strings escaped, numbers as text, functions by name,
    anything else argname + index; UNKNOWN when the value is a variable or a call's result."""
    if isinstance(node, ast.Lambda):
        return "<lambda>"
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return UNKNOWN if isinstance(node, (ast.Name, ast.Attribute, ast.Call)) and not _is_dict_call(node) \
            else f"{argname}{index}"
    if isinstance(value, str):
        return value.encode("unicode_escape").decode("ascii")
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    return f"{argname}{index}"


def _is_dict_call(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"


def _parametrize_ids(decorator: ast.Call) -> list[str] | None:
    """The ids one `@pytest.mark.parametrize(...)` gives, or None when they cannot be worked out here."""
    names, values = decorator.args[:2]
    if any(k.arg == "ids" for k in decorator.keywords) or not isinstance(values, (ast.List, ast.Tuple)):
        return UNKNOWN
    argnames = [n.strip() for n in ast.literal_eval(names).split(",")] if isinstance(names, ast.Constant) \
        else [ast.literal_eval(n) for n in names.elts]
    ids = []
    for index, case in enumerate(values.elts):
        parts = case.elts if len(argnames) > 1 else [case]
        part_ids = [_value_id(part, name, index) for part, name in zip(parts, argnames)]
        if UNKNOWN in part_ids:
            return UNKNOWN
        ids.append("-".join(part_ids))
    return _unique(ids)


def _unique(ids: list[str]) -> list[str]:
    """pytest's suffixes for repeated ids: `a0`, `a1` (`a_0` after a digit)."""
    counts, seen = Counter(ids), Counter()
    unique = []
    for id_ in ids:
        if counts[id_] > 1:
            unique.append(f"{id_}{'_' if id_[-1:].isdigit() else ''}{seen[id_]}")
            seen[id_] += 1
        else:
            unique.append(id_)
    return unique


def _is_parametrize(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "parametrize"


def _parametrized_fixtures(tree: ast.Module) -> set[str]:
    """Fixtures declared with `params=`: a test that uses one is parametrized by it."""
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
            for d in node.decorator_list if isinstance(d, ast.Call) and any(k.arg == "params" for k in d.keywords)}


@cache
def _tests(path: str) -> dict[str, list[str] | None]:
    """{test function: its ids ([] when not parametrized, None when they cannot be worked out)} of a file."""
    tree = ast.parse((ROOT / path).read_text())
    conftest = ast.parse((ROOT / "tests" / "conftest.py").read_text())
    by_fixture = _parametrized_fixtures(tree) | _parametrized_fixtures(conftest)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            stacked = [_parametrize_ids(d) for d in reversed(node.decorator_list) if _is_parametrize(d)]
            if by_fixture & {a.arg for a in node.args.args}:
                found[node.name] = UNKNOWN
            elif not stacked:
                found[node.name] = []
            elif UNKNOWN in stacked:
                found[node.name] = UNKNOWN
            else:  # stacked decorators: the one nearest the function comes first in the id
                ids = [""]
                for layer in stacked:
                    ids = [f"{a}-{b}" if a else b for a in ids for b in layer]
                found[node.name] = ids
    return found


def _missing(reference: tuple[str, str, str | None]) -> str | None:
    path, name, id_ = reference
    if not (ROOT / path).is_file():
        return f"{path} does not exist"
    tests = _tests(path)
    if name not in tests:
        return f"{path} has no test {name}"
    if id_ is not None and tests[name] == []:
        return f"{path}::{name} is not parametrized, so it has no [{id_}]"
    if id_ is not None and tests[name] is not UNKNOWN and id_ not in tests[name]:
        return f"{path}::{name} has no case [{id_}]; its ids: {tests[name]}"
    return None


# ---------------------------------------------------------------------------- the table


def test_every_test_the_table_names_exists():
    rows = _rows()
    assert all(REFERENCE.search(row[4]) for row in rows), [row[0] for row in rows if not REFERENCE.search(row[4])]
    references = [(m[1], m[2], m[3]) for row in rows for m in REFERENCE.finditer(row[4])]
    assert [problem for r in references if (problem := _missing(r))] == []


def test_rows_are_numbered_consecutively_with_a_known_area():
    rows = _rows()
    assert [row[0] for row in rows] == [str(i) for i in range(1, len(rows) + 1)]
    assert {row[1] for row in rows} <= set(AREAS), {row[1] for row in rows} - set(AREAS)
    assert [row[1] for row in rows] == sorted((row[1] for row in rows), key=AREAS.index), "rows grouped by area"


def test_at_least_40_distinct_bad_inputs_and_the_count_line_says_so():
    rows = _rows()
    inputs = [row[2].lower() for row in rows]
    assert [text for text, n in Counter(inputs).items() if n > 1] == [], "each row a distinct input or fault"
    by_area = Counter(row[1] for row in rows)
    bad_inputs = by_area["spec"] + by_area["data"] + by_area["storage"]
    assert bad_inputs >= 40
    (line,) = [line for line in _section() if COUNTS.match(line)]
    assert tuple(int(n) for n in COUNTS.match(line).groups()) == (
        bad_inputs, by_area["spec"], by_area["data"], by_area["storage"], by_area["fault"], by_area["operations"])


def test_the_checker_knows_pytest_ids():
    """The id rules above, on cases whose ids `pytest --collect-only` printed."""
    assert _tests("tests/test_spec.py")["test_temperature_must_be_positive"] == ["0", "-1.0"]
    assert _tests("tests/test_spec.py")["test_every_shipped_job_spec_is_valid"] is UNKNOWN  # ids=lambda
    assert _tests("tests/test_data_errors.py")["test_wrong_dtype_strings_where_numbers_are_expected"][0] == \
        "user_id-<lambda>-expected integer or text ids (text ids are hashed"
    assert _tests("tests/test_search.py")["test_a_search_spec_is_refused_naming_the_field"][2] == \
        "search2-teacher.search.space.lr: loguniform \\\\[lo, hi\\\\] needs lo < hi"
    assert _tests("tests/test_synthetic.py")["test_rejects_bad_sizes"][0] == "kwargs0-`days`"
    assert _unique(["a", "a", "b1", "b1"]) == ["a0", "a1", "b1_0", "b1_1"]
    assert _missing(("tests/test_spec.py", "test_wrong_type", "x")) and _missing(("tests/nope.py", "test_x", None))
