"""check_task: each mistake a new routed task can make fails in one line, before training."""

import pytest
import torch
from flwr.app import ArrayRecord
from test_strategy import bank, mock_grid, task_identity, theta  # noqa: F401

from rcsr_flower.routing import TaskCheckError, check_task
from rcsr_flower.routing.strategy import RCSRStrategy, RoutingOptions
from rcsr_flower.server.retrieval_task import RetrievalTask


class LossRoutedTask:
    """docs/extending.md's minimal task: routes on loss and update size."""

    token_dim = 2

    def __init__(self) -> None:
        self.prior = torch.zeros(3)

    def parse_reply(self, content):
        return None

    def token(self, report, update):
        norm = torch.sqrt(sum((u.float() ** 2).sum() for u in update.values()))
        return torch.stack([torch.tensor(report.loss), norm]).float()

    def router_objective(self, w, reports):
        return (w * torch.tensor([r.loss for r in reports])).sum()

    def update_state(self, weights, reports):
        self.prior = self.prior + weights.sum()

    def state_records(self):
        return {"prior": ArrayRecord({"prior": self.prior})}

    def state_tensors(self):
        return {"prior": self.prior}

    def load_state_tensors(self, tensors):
        self.prior = tensors["prior"].clone()


def test_well_formed_tasks_pass_and_keep_their_state():
    task = LossRoutedTask()
    check_task(task, ArrayRecord(theta(0)))
    assert torch.equal(task.prior, torch.zeros(3))  # the fake round left no trace
    retrieval = RetrievalTask(bank())
    before = retrieval.bank.to_tensors()
    check_task(retrieval, ArrayRecord(theta(0)))
    after = retrieval.bank.to_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)


class WrongShape(LossRoutedTask):
    def token(self, report, update):
        return torch.zeros(3)


class Float64Token(LossRoutedTask):
    def token(self, report, update):
        return torch.zeros(2, dtype=torch.float64)


class IgnoresW(LossRoutedTask):
    def router_objective(self, w, reports):
        return torch.tensor(sum(r.loss for r in reports))


class RecordsAsTensor(LossRoutedTask):
    def state_records(self):
        return self.prior


class LossyResume(LossRoutedTask):
    def load_state_tensors(self, tensors):
        self.prior = torch.zeros(3)


@pytest.mark.parametrize(
    ("task", "line"),
    [
        (WrongShape(), "WrongShape.token: has shape (3,), expected (2,) = token_dim"),
        (Float64Token(), "Float64Token.token: has dtype torch.float64, expected torch.float32"),
        (IgnoresW(), "IgnoresW.router_objective: does not depend on the weights w"),
        (
            RecordsAsTensor(),
            "RecordsAsTensor.state_records: returned Tensor, expected dict[str, ArrayRecord]",
        ),
        (LossyResume(), "LossyResume.load_state_tensors: does not restore what state_tensors"),
    ],
)
def test_each_task_mistake_is_one_line_naming_the_method(task, line):
    with pytest.raises(TaskCheckError) as err:
        check_task(task, ArrayRecord(theta(0)))
    assert line in str(err.value) and "\n" not in str(err.value)


def test_the_strategy_checks_its_task_before_any_client_trains():
    grid = mock_grid([1, 2])
    s = RCSRStrategy(Float64Token(), RoutingOptions(router_hidden=8, router_heads=2), 2)
    with pytest.raises(TaskCheckError, match=r"Float64Token\.token"):
        s.start(grid, ArrayRecord(theta(0)), num_rounds=1)
    grid.send_and_receive.assert_not_called()
