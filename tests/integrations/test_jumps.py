"""Jumps in a training loop (relex_merge.integrations.jumps): the move equals an independent dense
RELEX of the same snapshots, the optimizer state is untouched, the guard shortens or declines
jumps the window's backtest does not support, spilled snapshots give the same bytes as RAM, and
the reward guard undoes exactly the jump's displacement."""

from __future__ import annotations

import pytest
import torch

from relex_merge.common.errors import RelexError
from relex_merge.integrations.jumps import JumpConfig, Jumper, decide_jump
from tests.helpers import dense_relex


class Net(torch.nn.Module):
    """Tensors of several shapes: matrices, biases, a one-element bias, a frozen buffer-like parameter."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 12)
        self.b = torch.nn.Linear(12, 1)
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def _step(model, optimizer, x, y):
    loss = ((model(x) - y) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train_with_jumper(jumper, steps: int, seed: int = 0, lr: float = 1e-2):
    """Train ``steps`` steps with the jumper; returns the model, the optimizer and, per step, the
    weights before the jumper ran (``pre``) and after (``post``)."""
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, y = _data(seed)
    jumper.begin(model, 0)
    pre, post = {0: _params(model)}, {0: _params(model)}
    for step in range(1, steps + 1):
        _step(model, optimizer, x, y)
        pre[step] = _params(model)
        jumper.after_step(step)
        post[step] = _params(model)
    return model, optimizer, pre, post


@pytest.mark.parametrize("move", ["predict", "increment", "residual"])
def test_move_equals_dense_relex(move):
    every, ahead = 6, 9
    jumper = Jumper(every=every, ahead=ahead, guard=False, move=move)
    _, _, pre, post = _train_with_jumper(jumper, every)
    steps = list(range(1, every + 1))
    target = every + ahead
    for name, anchor in pre[0].items():
        snaps = [pre[s][name] for s in steps]
        ahead_point = dense_relex(anchor, snaps, steps, target)
        if move == "predict":
            want = ahead_point
        elif move == "increment":
            want = pre[every][name].double() + ahead_point - dense_relex(anchor, snaps, steps, every)
        else:
            here = dense_relex(anchor, snaps, steps, every, mode="reconstruct")
            want = pre[every][name].double() + ahead_point - here
        got = post[every][name].double()
        moved = (want - pre[every][name].double()).norm()
        assert moved > 0, name
        assert (got - want).norm() <= 1e-5 * moved + 1e-7 * want.norm(), (name, move)
    assert jumper.jumps == 1 and jumper.virtual_step == every + ahead
    assert jumper.history[0]["ahead"] == ahead


def test_optimizer_state_untouched_and_windows_restart():
    every = 5
    jumper = Jumper(every=every, ahead=5, guard=False)
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = _data()
    jumper.begin(model, 0)
    for step in range(1, 2 * every + 1):
        _step(model, optimizer, x, y)
        before = {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)} for k, s in optimizer.state.items()}
        weights = _params(model)
        jumper.after_step(step)
        for p, state in optimizer.state.items():
            for key, value in before[p].items():
                assert torch.equal(state[key], value), key  # Adam's moments and step count carry on
        if step % every:
            assert all(torch.equal(weights[n], p) for n, p in _params(model).items())  # no jump between
    assert jumper.jumps == 2
    assert [h["window"][0] for h in jumper.history] == [0, every]  # each window starts at the last jump
    assert jumper.store.ram.keys() == {"anchor"}  # the old window's snapshots are gone


def _planted_grams(kind: str, steps: list[int], seed: int = 0):
    """One tensor's Gram matrix for a trajectory of ``kind`` (deltas from the anchor at step 0)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(500, generator=g, dtype=torch.float64)
    rows = []
    for s in steps:
        noise = 0.002 * torch.randn(500, generator=g, dtype=torch.float64)
        if kind == "line":
            rows.append(s * direction + noise)
        elif kind == "sqrt":
            rows.append(s**0.5 * direction + noise)
        else:  # a random walk: no direction holds
            rows.append(torch.randn(500, generator=g, dtype=torch.float64) * 0.5 + (rows[-1] if rows else 0))
    d = torch.stack(rows)
    return d @ d.T


def test_guard_takes_shortens_or_declines():
    steps = list(range(1, 13))
    config = JumpConfig(every=12, ahead=24)
    line = decide_jump(["w"], [500], [_planted_grams("line", steps)], steps, 0, 24, config)
    assert line.ahead == 24 and line.metrics["supported"] == 1.0
    walk = decide_jump(["w"], [500], [_planted_grams("walk", steps)], steps, 0, 24, config)
    assert walk.ahead == 0 and walk.weights == {} and "no jump (guard)" in walk.reason
    sqrt = decide_jump(["w"], [500], [_planted_grams("sqrt", steps)], steps, 0, 24, config)
    assert 0 < sqrt.ahead < 24  # the decelerating window supports only a shorter jump
    unguarded = decide_jump(
        ["w"], [500], [_planted_grams("walk", steps)], steps, 0, 24, JumpConfig(every=12, guard=False)
    )
    assert unguarded.ahead == 24


def test_spilled_snapshots_give_the_same_bytes(tmp_path):
    ram = Jumper(every=5, ahead=5, guard=False)
    _, _, _, post_ram = _train_with_jumper(ram, 10)
    disk = Jumper(every=5, ahead=5, guard=False, memory_budget=0, scratch_dir=tmp_path)
    _, _, _, post_disk = _train_with_jumper(disk, 10)
    assert disk.store.spilled > 0 and not disk.store.ram
    for name in post_ram[10]:
        assert torch.equal(post_ram[10][name], post_disk[10][name]), name
    disk.close()
    assert not list(tmp_path.rglob("*.safetensors"))


def test_reward_guard_undoes_the_displacement():
    every, window = 6, 3
    for after, reverted in ((0.1, True), (0.49, False)):
        jumper = Jumper(every=every, ahead=6, guard=False, reward_guard=True, reward_window=window, reward_margin=0.05)
        torch.manual_seed(0)
        model = Net()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x, y = _data()
        jumper.begin(model, 0)
        metrics = {}
        for step in range(1, every + window + 2):
            _step(model, optimizer, x, y)
            if step == every:
                before_jump = _params(model)
            if step == every + window + 1:
                before_check = _params(model)
            metrics[step] = jumper.after_step(step)
            if step == every:
                after_jump = _params(model)
            jumper.record_reward(step, 0.5 if step <= every else after)  # logged after the step
        check = metrics[every + window + 1]
        assert check["relex/reverted"] == float(reverted)
        assert check["relex/reward_before"] == pytest.approx(0.5)
        now = _params(model)
        for name in now:
            displacement = after_jump[name] - before_jump[name]
            assert displacement.abs().max() > 0
            want = before_check[name] - displacement if reverted else before_check[name]
            torch.testing.assert_close(now[name], want, rtol=0, atol=1e-6)
        assert jumper.virtual_step == every + window + 1 + (0 if reverted else 6)
        assert "delta" not in jumper.store


def test_snapshot_every_and_stop_step():
    jumper = Jumper(every=6, ahead=6, snapshot_every=2, guard=False, stop_step=8)
    _train_with_jumper(jumper, 14)
    assert [h["window"] for h in jumper.history] == [[0, 2, 4, 6]]  # the second window would end past 8
    assert not jumper.store.ram and not jumper.store.disk


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"every": 0}, "every"),
        ({"every": 6, "snapshot_every": 4}, "snapshot_every"),
        ({"move": "sideways"}, "move"),
        ({"fit": "cubic-spline"}, "fit"),
        ({"every": 2, "fit": "polynomial"}, "window holds"),
        ({"memory_budget": "lots"}, "memory_budget"),
        ({"tolerance": float("nan")}, "tolerance"),
    ],
)
def test_bad_config_one_line(kwargs, key):
    with pytest.raises(RelexError) as info:
        JumpConfig(**kwargs)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_refuses_parameters_it_cannot_move():
    model = Net()
    model.a.weight.ds_id = 7  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    with pytest.raises(RelexError, match="DeepSpeed"):
        Jumper(every=4).begin(model)
    with pytest.raises(RelexError, match="begin"):
        Jumper(every=4).after_step(1)

    class ZeroOneTwo:  # DeepSpeed ZeRO-1/2's optimizer, as accelerate wraps it
        def __init__(self):
            self.optimizer = type("Inner", (), {"single_partition_of_fp32_groups": []})()

    with pytest.raises(RelexError, match="ZeRO-1/2"):
        Jumper(every=4).begin(Net(), 0, ZeroOneTwo())
