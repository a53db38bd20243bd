"""Minimax fairness weights (§5 step 3): up-weight clients the model serves worst."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class MinimaxWeights:
    """A distribution ``q`` over all ``N`` clients, uniform at start.

    Each round, for each participant ``q_k <- q_k·exp(η·loss_k)``; then the tempering
    ``q <- q^{1/(1+τ)}`` pulls ``q`` back toward uniform; normalise. The participants'
    weights are ``q[participants]`` renormalised.
    """

    def __init__(self, num_clients: int, eta: float = 0.1, tau: float = 0.1) -> None:
        if num_clients < 1:
            raise ValueError(f"MinimaxWeights needs at least one client, got {num_clients}")
        self.eta, self.tau = float(eta), float(tau)
        self.q = np.full(num_clients, 1.0 / num_clients)

    def step(self, participants: Sequence[int], losses: Sequence[float]) -> np.ndarray:
        """Update ``q`` with this round's losses; return the participants' weights."""
        idx = np.asarray(participants, dtype=int)
        if len(idx) == 0:
            return np.zeros(0)
        # in log space: exp(η·loss) of a large loss must not overflow
        log_q = np.log(self.q)
        log_q[idx] += self.eta * np.asarray(losses, dtype=float)
        log_q /= 1.0 + self.tau
        log_q -= log_q.max()
        q = np.exp(log_q)
        self.q = q / q.sum()
        w = self.q[idx]
        return w / w.sum()

    def state(self) -> dict:
        return {"q": self.q.tolist(), "eta": self.eta, "tau": self.tau}

    @classmethod
    def from_state(cls, state: dict) -> MinimaxWeights:
        m = cls(len(state["q"]), state["eta"], state["tau"])
        m.q = np.asarray(state["q"], dtype=float)
        return m
