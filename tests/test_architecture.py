"""The architecture's promises, checked on the code itself (docs/architecture.md):

- no import cycle among ``worldline.*`` modules (every import counts: inside functions and
  under ``if TYPE_CHECKING:`` too);
- ``data/`` never imports ``models/``, ``models/`` never imports ``train/``, ``data/`` or
  ``scripts/``, and the engine (``train/``) never imports a user script (``scripts/``);
- no file in ``train/`` over 500 lines, ``train/trainer.py`` at most 300;
- ``worldline-eval`` / ``worldline-sample`` build no optimizer, no training loader, no Trainer
  and no process group (single process), spied on the real classes while the real apps run.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"train": "worldline.train", "data": "worldline.data", "models": "worldline.models",
            "scripts": "worldline.scripts", "conf": "worldline.conf"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """worldline module -> the worldline modules it imports (anywhere in the file)."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text())
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for name in names:
                # the longest known module that the name starts with
                while name and name not in modules:
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                if name and name != mod:
                    graph[mod].add(name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 60  # the parser found the package
    assert find_cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    """The checker itself: a planted cycle is reported (so an empty list means something)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_layer_boundaries() -> None:
    graph = import_graph()
    for mod, deps in graph.items():
        top = mod.split(".")[1]
        layers = {d.split(".")[1] for d in deps}
        if top == "data":
            # The one allowed exception: the latent-encoding script takes an autoencoder in.
            assert "models" not in layers, (mod, deps)
        if top == "models":
            assert not layers & {"train", "data", "scripts"}, (mod, deps)
        if top == "train":
            assert "scripts" not in layers, (mod, deps)


def test_file_sizes() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "train").rglob("*.py")}
    assert sizes["trainer.py"] <= 300, sizes["trainer.py"]
    big = {n: s for n, s in sizes.items() if s > 500}
    assert not big, big


@pytest.fixture()
def spies(monkeypatch):
    """Record (without changing what they do) every optimizer, Trainer, training loader and
    process group created while the block runs."""
    import torch
    import torch.distributed as dist

    from worldline.train import build, loaders, trainer

    made: dict[str, int] = {"optimizer": 0, "trainer": 0, "training_loader": 0, "pg": 0}

    def count(key, fn):
        def wrapped(*a, **k):
            made[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(torch.optim.Optimizer, "__init__",
                        count("optimizer", torch.optim.Optimizer.__init__))
    monkeypatch.setattr(trainer.Trainer, "__init__", count("trainer", trainer.Trainer.__init__))
    monkeypatch.setattr(loaders.LoaderFactory, "training",
                        count("training_loader", loaders.LoaderFactory.training))
    monkeypatch.setattr(dist, "init_process_group", count("pg", dist.init_process_group))
    assert build.build_trainer  # imported: the spies sit on the classes it would use
    return made


def test_eval_and_sample_build_no_trainer(tmp_path, spies) -> None:
    """In-process worldline-eval and worldline-sample on a trained run: nothing of training
    is constructed. The same runs' training (first) is the positive control."""
    import torch.distributed as dist

    from _runs import compose_cfg, smoke_overrides
    from worldline.train.evaluate import run_eval
    from worldline.train.main import run_training
    from worldline.train.sampling import run_sample

    data = tmp_path / "data"
    run_training(compose_cfg(smoke_overrides(tmp_path, "ae", data, "stage=autoencoder",
                                             "train.steps=2")))
    run_training(compose_cfg(smoke_overrides(tmp_path, "w", data, "stage=pretrain",
                                             f"stage.autoencoder_from={tmp_path / 'ae'}",
                                             "train.steps=2", "sample.num_steps=1")))
    assert spies["optimizer"] >= 2 and spies["trainer"] == 2 and spies["training_loader"] == 2
    for k in spies:
        spies[k] = 0
    common = ["experiment=smoke", f"run.root={tmp_path}", f"data.root={data}", "logger=none"]
    report = run_eval(compose_cfg([*common, f"eval.checkpoint={tmp_path / 'w'}",
                                   "eval.num_steps=1", "eval.num_clips=2"]))
    assert report["val_loss"] > 0
    files = run_sample(compose_cfg([*common, f"sample.checkpoint={tmp_path / 'w'}",
                                    "sample.num_steps=1", "sample.prompts=[a red circle]",
                                    f"sample.out={tmp_path / 'out'}"]))
    assert any(str(f).endswith(".mp4") for f in files)
    assert spies == {"optimizer": 0, "trainer": 0, "training_loader": 0, "pg": 0}
    assert not dist.is_initialized()
