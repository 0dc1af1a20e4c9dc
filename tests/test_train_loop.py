"""megapuzzle.train.loop on a real (tiny) regression trained with AdamW and saved with
train.state: the logging / checkpoint / evaluation cadence, the line's scalar order, and a
simulated kill + resume that ends bitwise where the uninterrupted run does."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megapuzzle.train.faults import kill_after
from megapuzzle.train.loop import TrainLoop, line_scalars
from megapuzzle.train.schedule import LRSchedule, set_lr
from megapuzzle.train.state import load_train_state, save_train_state
from megapuzzle.train.train_logger import TrainLogger

TOTAL, LOG, CKPT = 10, 4, 3


def _train(state_dir: Path, calls: dict[str, list] | None = None, eval_every: int = 0):
    """Fit y = x @ w_true with AdamW; resumes from `state_dir`. (stopped step or None, weights)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    resumed = load_train_state(state_dir, params, opt)
    start = resumed["step"] if resumed else 0
    calls = calls if calls is not None else {}

    def step(i: int, lr: float) -> dict:
        g = torch.Generator().manual_seed(i)  # the batch of step i, whatever the start
        x = torch.randn(8, 4, generator=g)
        set_lr(opt, lr)
        loss = (model(x) - x @ torch.arange(1.0, 5.0)[:, None]).pow(2).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
        opt.step()
        opt.zero_grad()
        calls.setdefault("lr", []).append(lr)
        return {"grad norm": norm, "loss": loss.item(), "detail/w0": model.weight[0, 0].item()}

    def save(n: int) -> None:
        calls.setdefault("save", []).append(n)
        save_train_state(state_dir, n, params, opt)

    loop = TrainLoop("test-loop", TOTAL, LRSchedule(0.1, TOTAL, 2, 0.01), TrainLogger(None, TOTAL), LOG, CKPT, 8)
    stopped = loop.run(start, step, save, evaluate=lambda n: calls.setdefault("eval", []).append(n),
                       eval_every=eval_every)
    return stopped, model.weight.detach().clone(), start


def test_cadence_and_line(tmp_path, capsys):
    calls: dict[str, list] = {}
    assert _train(tmp_path / "a", calls, eval_every=5)[0] is None
    assert calls["save"] == [3, 6, 9, 10] and calls["eval"] == [5, 10]
    sched = LRSchedule(0.1, TOTAL, 2, 0.01)
    assert calls["lr"] == [sched(i) for i in range(TOTAL)]
    lines = [line for line in capsys.readouterr().out.splitlines() if "iteration" in line]
    assert [int(re.search(r"iteration +(\d+)/", line).group(1)) for line in lines] == [4, 8, 10]
    # losses, then lr, then the grad norms; "/" names are tensorboard-only
    assert re.search(r"\| loss: \S+ \| lr: \S+ \| grad norm: \S+ \|$", lines[0]) and "detail" not in lines[0]
    assert line_scalars({"grad norm max": 1.0, "nmse mean": 2.0, "a/b": 3.0}, 0.5) == (
        {"nmse mean": 2.0, "lr": 0.5, "grad norm max": 1.0}, {"a/b": 3.0})


def test_kill_and_resume_gives_bitwise_the_same_weights(tmp_path):
    _, full, _ = _train(tmp_path / "full")
    with kill_after("test-loop", 8):  # killed before step 8: the last checkpoint is at 6
        stopped, _, _ = _train(tmp_path / "killed")
    assert stopped == 8
    calls: dict[str, list] = {}
    stopped, resumed, start = _train(tmp_path / "killed", calls)
    assert stopped is None and start == 6 and calls["save"] == [9, 10]
    assert torch.equal(full, resumed)
