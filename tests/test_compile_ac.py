"""dist.compile_blocks (auto/true/false) and its compile counter; activation checkpointing
modes (attention-only, selective) against no AC; their config rules.

Compiling with Inductor on this 2-core CPU takes minutes (~200 s for the tiny DiT's two
shapes), so the compiled-vs-eager test uses the ``aot_eager`` backend: the same dynamo graphs,
guards and recompiles (what the counter counts), AOTAutograd's forward/backward split, no C++
build. The Inductor comparison is in BENCHMARKS.md (scripts/bench_compile_ac.py)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from _runs import compose_cfg, smoke_overrides
from worldline.models.dit import DiTArgs, VideoDiT
from worldline.train.config import ConfigError, WorldlineConfig
from worldline.train.parallel.base import apply_activation_checkpointing, compile_blocks
from worldline.train.parallel.compile import (
    compile_metrics,
    configure_recompile_limit,
    resolve_compile_blocks,
)
from worldline.train.validate import validate


def _dit(depth: int = 2) -> VideoDiT:
    torch.manual_seed(0)
    m = VideoDiT(DiTArgs(in_channels=4, hidden_size=64, depth=depth, num_heads=4, text_dim=0,
                         num_action_slots=0, camera_dim=0))
    with torch.no_grad():  # off the adaLN-zero init: every block and its attention matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_compile_blocks_auto_resolves_per_device() -> None:
    assert resolve_compile_blocks(None, torch.device("cpu"))[0] is False
    assert resolve_compile_blocks(None, torch.device("cuda"))[0] is True
    assert resolve_compile_blocks(None, torch.device("cuda", 1), "fsdp")[0] is True
    on, why = resolve_compile_blocks(None, torch.device("cuda"), "deepspeed_zero3")
    assert on is False and "deepspeed_zero3" in why
    assert resolve_compile_blocks(True, torch.device("cpu"))[0] is True
    assert resolve_compile_blocks(False, torch.device("cuda"))[0] is False
    assert WorldlineConfig().dist.compile_blocks is None  # auto is the default


@pytest.fixture
def dynamo_limit():
    """Restore dynamo's recompile limit after the test (configure_recompile_limit raises it
    process-wide)."""
    import torch._dynamo.config as dcfg

    old = dcfg.recompile_limit
    yield
    dcfg.recompile_limit = old


def test_compiled_blocks_match_eager_and_compile_once_per_shape(dynamo_limit) -> None:
    torch._dynamo.reset()
    assert configure_recompile_limit(2) >= 8  # never below torch's default
    eager, comp = _dit(), _dit()
    assert compile_blocks(comp, backend="aot_eager") == 2
    before = compile_metrics()
    # Two bucket shapes (frames x height x width differ), the first one again at the end.
    shapes = [(2, 4, 3, 4, 4), (2, 4, 2, 4, 6), (2, 4, 3, 4, 4), (2, 4, 2, 4, 6)]
    losses: dict[str, list[float]] = {"eager": [], "comp": []}
    for name, m in (("eager", eager), ("comp", comp)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        for s in shapes:
            loss = m(torch.randn(*s, generator=g), torch.rand(s[0], generator=g)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["comp"], losses["eager"], rtol=1e-5, atol=1e-6)
    after = compile_metrics()
    graphs = after["compile/graphs"] - before["compile/graphs"]
    recompiles = after["compile/recompiles"] - before["compile/recompiles"]
    # Both blocks share DiTBlock.forward's cache: one graph per shape, nothing after that.
    assert (graphs, recompiles) == (2, 1), after


def test_trainer_log_row_carries_compile_metrics(dynamo_limit) -> None:
    """The trainer's periodic row takes compile_metrics() (train/trainer.py ``_log``)."""
    import inspect

    from worldline.train.trainer import Trainer

    assert "compile_metrics()" in inspect.getsource(Trainer._log)
    configure_recompile_limit(1)
    assert set(compile_metrics()) == {"compile/graphs", "compile/recompiles"}


def _saved(m: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[int, dict]:
    """(bytes autograd saved for backward, unique storages; gradients by name)."""
    seen: dict[int, int] = {}

    def pack(s: torch.Tensor) -> torch.Tensor:
        seen[s.untyped_storage().data_ptr()] = s.untyped_storage().nbytes()
        return s

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        out = m(x, t)
    out.square().mean().backward()
    return sum(seen.values()), {n: p.grad for n, p in m.named_parameters()}


def test_attention_and_selective_ac_same_gradients_less_saved() -> None:
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 3, 4, 4, generator=g), torch.rand(2, generator=g)
    base = _dit()
    ref_bytes, ref = _saved(copy.deepcopy(base), x, t)
    got = {}
    for mode in ("attention", "selective", "full"):
        m = copy.deepcopy(base)
        assert apply_activation_checkpointing(m, mode, 1) == 2
        got[mode], grads = _saved(m, x, t)
        assert [n for n, _ in m.named_parameters()] == list(ref)
        for n, gr in grads.items():
            torch.testing.assert_close(gr, ref[n], rtol=1e-5, atol=1e-7, msg=f"{mode} {n}")
    # Attention-only keeps the MLP's activations: between full AC and none.
    assert got["full"] < got["attention"] < ref_bytes, (got, ref_bytes)
    # every ac_every-th block: with 2 blocks and every=2 only block 0's attention.
    assert apply_activation_checkpointing(copy.deepcopy(base), "attention", 2) == 1


def _cfg(tmp_path: Path, *extra: str):
    return compose_cfg(smoke_overrides(tmp_path, "x", tmp_path, "stage=pretrain",
                                       "stage.autoencoder_from=x", *extra))


def test_ac_and_compile_config_rules(tmp_path: Path) -> None:
    from hydra.errors import ConfigCompositionException

    # From the command line the schema's enum rejects it while composing, naming the key.
    with pytest.raises(ConfigCompositionException, match=r"dist\.activation_checkpointing"):
        _cfg(tmp_path, "dist.activation_checkpointing=foo")
    # A config built in code is not type-checked: validate() names the key.
    cfg = WorldlineConfig()
    cfg.dist.activation_checkpointing = "foo"
    with pytest.raises(ConfigError, match=r"dist\.activation_checkpointing: 'foo'"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"dist\.activation_checkpointing"):
        validate(_cfg(tmp_path, "dist=fsdp", "dist.cp=2",
                      "dist.activation_checkpointing=attention"))
    validate(_cfg(tmp_path, "dist.activation_checkpointing=attention"))
    # ZeRO-3: explicit true rejected, auto fine (resolves to off at parallelize time).
    with pytest.raises(ConfigError, match=r"dist\.compile_blocks"):
        validate(_cfg(tmp_path, "dist=deepspeed_zero3", "dist.compile_blocks=true"))
    validate(_cfg(tmp_path, "dist=deepspeed_zero3"))
    assert _cfg(tmp_path, "dist.compile_blocks=null").dist.compile_blocks is None
