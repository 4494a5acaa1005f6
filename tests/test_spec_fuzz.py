"""Fuzzing the spec loader: random documents and random mutations of the shipped specs either load
or raise SpecError, never another exception (which would reach the user as a traceback)."""

from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import SpecError
from pipeline.spec import load_spec, parse_spec
from tests.conftest import JOBS

SHIPPED = [yaml.safe_load(p.read_text()) for p in sorted(JOBS.glob("*.yaml"))]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.dates())
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)


def _loads_or_spec_error(raw) -> None:
    try:
        parse_spec(raw)
    except SpecError as exc:
        assert str(exc)  # a message, not an empty error


@settings(max_examples=300, deadline=None)
@given(documents)
def test_random_documents_never_crash(raw):
    _loads_or_spec_error(raw)


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SHIPPED))), st.data(), documents)
def test_mutated_shipped_specs_never_crash(index, data, replacement):
    raw = copy.deepcopy(SHIPPED[index])
    path = data.draw(st.sampled_from(list(_paths(raw))))
    node = raw
    for key in path[:-1]:
        node = node[key]
    action = data.draw(st.sampled_from(["replace", "delete", "rename"]))
    if action == "replace":
        node[path[-1]] = replacement
    elif action == "delete":
        del node[path[-1]]
    else:
        node[str(path[-1]) + "x"] = node.pop(path[-1])
    _loads_or_spec_error(raw)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_random_yaml_text_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    path.write_text(text)
    try:
        load_spec(path)
    except SpecError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=30))
def test_random_overrides_never_crash(tmp_path_factory, override):
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    path.write_text(yaml.safe_dump(SHIPPED[0]))
    try:
        load_spec(path, [override])
    except SpecError:
        pass
