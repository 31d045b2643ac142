"""DESIGN: dependencies point inward. node/ core imports no network, GPU or scheduler
library; only the composition root and modules whose job is that library may."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"pynetdicom", "dicomweb_client", "torch", "monai", "apscheduler", "adapters",
         "requests", "httpx", "ray"}
# module (relative to node/) -> libraries it may import
ALLOWED = {
    "app.py": {"adapters", "pynetdicom", "dicomweb_client", "apscheduler"},
    "cli.py": {"adapters", "pynetdicom", "dicomweb_client", "apscheduler"},
    "listener.py": {"adapters"},        # the composition root of a listener child
    "inference": {"torch", "monai"},
    "finetune": {"torch", "monai"},     # training, evaluation; never on the receiver path
    "schedule.py": {"apscheduler"},
    "inference/ray_executor.py": {"ray"},       # the Ray executor, and nothing else
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_node_core_does_not_import_adapters_or_heavy_libraries() -> None:
    offenders = []
    for path in sorted((ROOT / "node").rglob("*.py")):
        rel = path.relative_to(ROOT / "node")
        allowed = ALLOWED.get(rel.parts[0], set()) | ALLOWED.get(rel.as_posix(), set())
        bad = (_imports(path) & HEAVY) - allowed
        if bad:
            offenders.append(f"node/{rel.as_posix()}: {sorted(bad)}")
    assert offenders == []


def test_adapters_do_not_import_the_composition_root() -> None:
    for path in sorted((ROOT / "adapters").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in {"node.app", "node.cli"}, path


def test_receiver_path_never_imports_torch() -> None:
    import subprocess
    import sys
    code = ("import sys, node.app, node.cli, node.listener, adapters.dimse; "
            "print(sorted(m for m in ('torch', 'monai', 'ray', 'node.finetune.pipeline') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.strip()
    assert out == "[]"


def test_a_running_receiver_with_models_configured_never_imports_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support import write_config
    from tests.unit.test_runner import make_bundle

    bundle = make_bundle(tmp_path / "bundle")
    config = write_config(tmp_path / "cfg", models=[{"name": "m", "path": str(bundle)}],
                          routes=[{"name": "r", "match": {"Modality": "CT"}, "models": ["m"]}])
    code = (
        "import sys\n"
        "from node.settings import load_settings\n"
        "from node.app import Node\n"
        f"node = Node(load_settings({str(config)!r}), spawn_worker=True)\n"
        "node.start()\n"
        "print(sorted(m for m in ('torch', 'monai', 'ray') if m in sys.modules))\n"
        "node.stop()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_finetune_entry_points_and_registry_import_no_torch() -> None:
    """The worker and the CLI resolve active model versions through the registry, and the
    scheduler imports ``node.finetune.nightly``: neither may pull torch in by itself."""
    import subprocess
    import sys
    code = ("import sys, node.finetune, node.finetune.registry, node.finetune.deid; "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.strip()
    assert out == "[]"
