"""Security properties: no code runs from data or specs, the local dashboard stays on loopback, and
credentials never echo back in an error.
"""

from __future__ import annotations

import ast
import copy
import inspect

import pytest
import yaml

from pipeline.cli import main
from pipeline.errors import SpecError
from pipeline.spec import load_spec, parse_spec
from tests.conftest import FAKE_AWS, ROOT

# Calls that run code or build objects from bytes: never in the pipeline (yaml.safe_load is the one loader).
_FORBIDDEN = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("pickle", "load"),
              ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("marshal", "loads"),
              (None, "eval"), (None, "exec"), (None, "__import__")}


def _unsafe_calls(source: str, name: str) -> list[str]:
    """Forbidden calls, imports of forbidden loaders, and `torch.load` without `weights_only=True`.

    The syntax tree, not a text grep: `model.eval()` and a docstring that says "eval(" are fine.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and any((node.module, a.name) in _FORBIDDEN for a in node.names):
            found.append(f"{name}:{node.lineno}: from {node.module} import {[a.name for a in node.names]}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        owner = None  # a bare name's call; "<expr>" for a method of anything but a plain name (a.b.eval())
        if isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else "<expr>"
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (owner, called) in _FORBIDDEN or (isinstance(func, ast.Name) and (None, called) in _FORBIDDEN):
            found.append(f"{name}:{node.lineno}: {owner + '.' if owner else ''}{called}(")
        if (owner, called) == ("torch", "load"):
            weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{name}:{node.lineno}: torch.load without weights_only=True")
    return found


def _pipeline_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "pipeline").rglob("*.py"))}


def test_the_checker_catches_what_it_looks_for():
    bad = ("import yaml, pickle, torch\nfrom yaml import unsafe_load\nyaml.load(s)\nyaml.unsafe_load(s)\n"
           "pickle.load(f)\neval('1')\nexec('x = 1')\ntorch.load(p)\ntorch.load(p, weights_only=False)\n")
    assert len(_unsafe_calls(bad, "bad.py")) == 8
    fine = "yaml.safe_load(s)\nmodel.eval()\nmember.engine.eval()\n'''eval( in a docstring'''\ntorch.load(p, weights_only=True)\n"
    assert _unsafe_calls(fine, "fine.py") == []


def test_pipeline_never_loads_code_from_data():
    sources = _pipeline_sources()
    found = [hit for name, text in sources.items() for hit in _unsafe_calls(text, name)]
    assert found == []
    loads = sum(text.count("torch.load(") for text in sources.values())
    assert loads >= 1, "checkpoints load somewhere: the weights_only check must have something to check"
    assert any("yaml.safe_load(" in text for text in sources.values())


@pytest.mark.parametrize("tag", ['!!python/object/apply:os.system ["touch {marker}"]',
                                 '!!python/object/new:subprocess.Popen [["touch", "{marker}"]]'])
def test_yaml_python_tags_are_a_spec_error_and_run_nothing(tmp_path, tiny_spec_dict, capsys, tag):
    marker = tmp_path / "pwned"
    text = yaml.safe_dump(tiny_spec_dict).replace("name: tiny", f"name: {tag.format(marker=marker)}")
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r"evil\.yaml: YAML tag refused at line \d+, column \d+ \(could not "
                                        r"determine a constructor for the tag 'tag:yaml\.org,2002:python/"):
        load_spec(path)
    assert main(["validate", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()


def test_yaml_python_tag_in_an_override_runs_nothing(tmp_path, tiny_spec_dict):
    marker = tmp_path / "pwned"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict))
    with pytest.raises(SpecError, match="the value is not valid YAML"):
        load_spec(path, [f'name=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


def test_local_ray_dashboard_binds_to_loopback(monkeypatch, tiny_spec_dict):
    """`ray_session` starts a local Ray with its dashboard on 127.0.0.1 (ray.init recorded, not run)."""
    import ray

    from pipeline.runtime import ray_session

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # even inside a test session that runs Ray
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with ray_session(parse_spec(tiny_spec_dict)):
        pass
    assert len(calls) == 1 and calls[0]["dashboard_host"] == "127.0.0.1"
    assert 'dashboard_host="127.0.0.1"' in inspect.getsource(ray_session)


def test_cluster_commands_default_to_the_loopback_jobs_api(monkeypatch):
    from pipeline import submit

    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert submit.resolve_address(None) == ("http://127.0.0.1:8265", "the default")


def _leaks(message: str) -> list[str]:
    return [secret for secret in FAKE_AWS.values() if secret in message]


@pytest.mark.parametrize("placement", ["storage", "storage-other-names", "top-level", "section"])
def test_credentials_in_a_spec_are_refused_without_echoing_them(tiny_spec_dict, tmp_path, capsys, placement):
    raw = copy.deepcopy(tiny_spec_dict)
    key, secret = FAKE_AWS["AWS_ACCESS_KEY_ID"], FAKE_AWS["AWS_SECRET_ACCESS_KEY"]
    if placement == "storage":
        raw["storage"] = {"region": "us-east-1", "aws_access_key_id": key, "aws_secret_access_key": secret}
    elif placement == "storage-other-names":
        raw["storage"] = {"password": secret, "session_token": key}
    elif placement == "top-level":
        raw["aws_secret_access_key"] = secret
    else:
        raw["data"]["access_key"] = key
        raw["train"]["secret"] = secret
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    assert _leaks(str(info.value)) == []
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert _leaks(captured.out + captured.err) == []
    if placement.startswith("storage"):
        assert "look like credentials, which never belong in a spec; export AWS_ACCESS_KEY_ID" in captured.err


def test_credentials_given_as_an_override_are_not_echoed(tiny_spec_dict, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict))
    secret = FAKE_AWS["AWS_SECRET_ACCESS_KEY"]
    assert main(["validate", str(path), "--set", f"storage.secret_key={secret}"]) == 2
    captured = capsys.readouterr()
    assert "storage: ['secret_key'] look like credentials" in captured.err and _leaks(captured.out + captured.err) == []

