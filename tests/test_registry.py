"""Model registry: immutable versions, atomic CURRENT, promotion history and rollback."""

from __future__ import annotations

import hashlib

import pytest

from pipeline import registry, storage


@pytest.fixture
def root(tmp_path) -> str:
    return str(tmp_path / "registry")


def _parity(files: dict[str, bytes], passed: bool = True) -> dict:
    return {"passed": passed, "variants": {"onnx": {"passed": passed, "file": "onnx/model.onnx",
                                                    "sha256": hashlib.sha256(files["onnx/model.onnx"]).hexdigest()}}}


def _publish(root: str, version: str, auc: float = 0.7, passed: bool = True) -> str:
    files = {"model.pt": b"weights-" + version.encode(), "onnx/model.onnx": b"onnx-" + version.encode()}
    return registry.publish(root, "ctr", version, files, {"metrics": {"auc": auc}, "lineage": {"teacher_sha256": "abc"},
                                                          "parity": _parity(files, passed)})


def test_publish_writes_a_complete_version(root):
    directory = _publish(root, "2026-11-01-aaaa")
    assert storage.read_bytes(storage.join(directory, "model.pt")) == b"weights-2026-11-01-aaaa"
    assert registry.list_versions(root, "ctr") == ["2026-11-01-aaaa"]
    assert registry.show(root, "ctr", "2026-11-01-aaaa")["metrics"] == {"auc": 0.7}
    assert registry.current(root, "ctr") is None  # publishing is not promoting


def test_publish_is_idempotent(root):
    directory = _publish(root, "v1")
    mtime = storage.filesystem(directory)[0].modified(storage.join(directory, "model.pt"))
    _publish(root, "v1", auc=0.1)
    assert storage.filesystem(directory)[0].modified(storage.join(directory, "model.pt")) == mtime
    assert registry.show(root, "ctr", "v1")["metrics"]["auc"] == 0.7


def test_incomplete_version_is_invisible_and_cannot_be_promoted(root):
    directory = registry.version_dir(root, "ctr", "v2")
    storage.atomic_write_bytes(storage.join(directory, "model.pt"), b"half")  # crash before _COMPLETE
    assert registry.list_versions(root, "ctr") == []
    with pytest.raises(registry.RegistryError, match="'v2' of 'ctr' is not in the registry"):
        registry.promote(root, "ctr", "v2", "test")


def test_promote_and_rollback(root):
    for version in ("v1", "v2", "v3"):
        _publish(root, version)
        registry.promote(root, "ctr", version, "gate passed")
    assert registry.current(root, "ctr") == "v3"
    assert registry.rollback(root, "ctr") == "v2"
    assert registry.current(root, "ctr") == "v2"
    assert registry.rollback(root, "ctr") == "v1"
    with pytest.raises(registry.RegistryError, match="no earlier champion"):
        registry.rollback(root, "ctr")
    actions = [(e["action"], e["version"]) for e in registry.history(root, "ctr")]
    assert actions == [("promote", "v1"), ("promote", "v2"), ("promote", "v3"), ("rollback", "v2"),
                       ("rollback", "v1")]


def test_crash_between_publish_and_switch_keeps_the_old_champion(root, monkeypatch):
    _publish(root, "v1")
    registry.promote(root, "ctr", "v1", "first")
    _publish(root, "v2")
    real_write = storage.atomic_write_text

    def crash_on_current(uri, text):
        if uri.endswith("CURRENT"):
            raise OSError("power cut")
        real_write(uri, text)

    monkeypatch.setattr(storage, "atomic_write_text", crash_on_current)
    with pytest.raises(OSError):
        registry.promote(root, "ctr", "v2", "second")
    monkeypatch.undo()
    assert registry.current(root, "ctr") == "v1"
    assert not [p for p in storage.list_dir(storage.join(root, "ctr")) if p.startswith(".tmp")]
    # The rerun that finishes the promotion replaces the note the crash left: HISTORY stays one chain.
    registry.promote(root, "ctr", "v2", "second, again")
    moves = [(e["version"], e["previous"], e["reason"]) for e in registry.history(root, "ctr")]
    assert moves == [("v1", None, "first"), ("v2", "v1", "second, again")]
    assert registry.current(root, "ctr") == "v2"


def test_current_moves_only_to_a_version_whose_export_passed_parity(root):
    _publish(root, "v1")
    registry.promote(root, "ctr", "v1", "first")
    _publish(root, "v2", passed=False)
    with pytest.raises(registry.RegistryError, match="'v2' of 'ctr' cannot become CURRENT: its onnx export failed parity"):
        registry.promote(root, "ctr", "v2", "manual")
    registry.publish(root, "ctr", "v3", {"model.pt": b"w"}, {"metrics": {}})  # an old-style version, no export
    with pytest.raises(registry.RegistryError, match="has no parity.json"):
        registry.promote(root, "ctr", "v3", "manual")
    assert registry.current(root, "ctr") == "v1" and [e["version"] for e in registry.history(root, "ctr")] == ["v1"]


def test_a_corrupted_export_cannot_be_promoted_or_rolled_back_to(root):
    first = _publish(root, "v1")
    registry.promote(root, "ctr", "v1", "first")
    _publish(root, "v2")
    registry.promote(root, "ctr", "v2", "second")
    storage.atomic_write_bytes(storage.join(first, "onnx/model.onnx"), b"onnx-v1 but one byte changed")
    assert "not the one parity checked" in registry.export_problems(root, "ctr", "v1")[0]
    with pytest.raises(registry.RegistryError, match="sha256 differs"):
        registry.rollback(root, "ctr")
    assert registry.current(root, "ctr") == "v2"
    storage.remove_tree(storage.join(first, "onnx"))
    with pytest.raises(registry.RegistryError, match="onnx/model.onnx is missing"):
        registry.promote(root, "ctr", "v1", "manual")
