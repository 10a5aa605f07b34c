"""Security (issue 7): no code is ever run from a file uvsam loads, the local cluster listens on
the loopback only, and downloaded weights are used only once their SHA-256 matches."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

SOURCES = sorted(p for d in ("uvsam", "tiles") for p in (ROOT / d).rglob("*.py"))


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_file_is_ever_unpickled_evaluated_or_loaded_unsafely():
    """Every torch.load passes weights_only=True; no pickle.load(s), eval, exec, yaml.load,
    yaml.unsafe_load, numpy allow_pickle=True or marshal anywhere in the package."""
    problems = []
    for path in SOURCES:
        for node, name in _calls(path):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name in ("eval", "exec", "compile", "pickle.load", "pickle.loads", "marshal.loads", "yaml.load",
                        "yaml.unsafe_load", "yaml.full_load", "torch.jit.load", "dill.load"):
                problems.append(f"{where}: {name}")
            if name == "torch.load" and kw.get("weights_only") != "True":
                problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and kw.get("allow_pickle") not in (None, "False"):
                problems.append(f"{where}: np.load with allow_pickle")
    assert len(SOURCES) > 30 and not problems, problems


def test_the_scan_would_catch_an_unsafe_load(tmp_path):
    """The scan above is not vacuous: it flags each unsafe form in a file written to trip it."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, pickle, yaml\ntorch.load(p)\npickle.load(f)\nyaml.load(t)\neval(s)\n"
                   "torch.load(p, weights_only=False)\n")
    names = [n for _, n in _calls(bad)]
    assert names.count("torch.load") == 2 and {"pickle.load", "yaml.load", "eval"} <= set(names)


def test_a_workflow_yaml_cannot_construct_python_objects(tmp_path):
    from uvsam.errors import InputError
    from uvsam.workflow import load

    wf = tmp_path / "w.yaml"
    wf.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load(wf)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_the_local_cluster_listens_on_the_loopback_only():
    from uvsam.prediction.distributed import make_client

    with make_client(None, 1) as client:
        info = client.scheduler_info()
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in info["workers"])
        assert client.dashboard_link.startswith("http://127.0.0.1:")
