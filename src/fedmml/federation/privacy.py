"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018) with a fixed or adaptive clipping bound
(Andrew et al. 2021), and an accountant (Google's dp-accounting) that says epsilon at delta after each round.

A client clips the change it made to the slice it trains (every float tensor of that slice, one L2 bound;
BatchNorm's running statistics within their own share of it, privacy.stats_share) and says whether the
bound cut it. The server clips again what it decodes, so the bound holds for whatever a client sent and
after int8/fp16 transport has rounded it; it sums the clipped changes, adds Gaussian noise of standard
deviation noise_multiplier x clip to the sum of every tensor trained, and divides each tensor by the number
of clients expected to send it (sampling rate x the clients whose slice holds it).
The denominator is fixed in advance, as the analysis needs: a client that fails lowers the sum, not the
noise. Each client counts once, whatever its sample count.

This is central DP: the server sees each round's clipped updates and draws the noise. The guarantee covers
every model the server sends or writes and what is computed from them; it does not cover the metadata a
client reports beside its update (sample count, training loss, steps), nor integer buffers, which are
averaged as without privacy.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedmml.config import Config, ConfigError, PrivacyConfig
from fedmml.federation.aggregate import RunningMean

if TYPE_CHECKING:
    import dp_accounting


def l2_norm(tensors: dict[str, torch.Tensor]) -> float:
    """The L2 norm of every float tensor of ``tensors`` together (float64 sums)."""
    floats = [v for v in tensors.values() if v.is_floating_point()]
    return math.sqrt(sum(float(torch.linalg.vector_norm(v, dtype=torch.float64)) ** 2 for v in floats))


def is_statistic(key: str) -> bool:
    """Whether ``key`` is a BatchNorm running statistic: a float that training moves without a gradient."""
    return key.endswith(("running_mean", "running_var"))


def _factor(norm: float, bound: float) -> float:
    return bound / norm if norm > bound else 1.0  # a zero change has nothing to clip


def clip_factors(
    delta: dict[str, torch.Tensor], bound: float, stats_share: float = 1.0
) -> tuple[float, float, bool]:
    """The factors that clip ``delta``'s weights and its BatchNorm running statistics to ``bound``, and
    whether the weights were within it. With ``stats_share`` below 1 (privacy.stats_share) the statistics
    are clipped apart, to ``stats_share x bound``, and the weights to ``sqrt(1 - stats_share^2) x bound``:
    the whole change stays within ``bound``, so the noise and the guarantee are as with one clip. The
    statistics of small batches move far more than the weights (LW on Tux Paint, batches of 2: by 44 against
    3.6 in L2 norm); clipped together, the weights would keep a few percent of the bound. "Within" follows
    the weights alone then: their norm is what adaptive clipping should track, and the statistics' small
    share is meant to cut them."""
    if stats_share >= 1:
        norm = l2_norm(delta)
        factor = _factor(norm, bound)
        return factor, factor, norm <= bound
    weights = l2_norm({k: v for k, v in delta.items() if not is_statistic(k)})
    stats = l2_norm({k: v for k, v in delta.items() if is_statistic(k)})
    weights_bound = math.sqrt(1 - stats_share**2) * bound
    return _factor(weights, weights_bound), _factor(stats, stats_share * bound), weights <= weights_bound


def clip_update(
    update: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    bound: float,
    stats_share: float = 1.0,
) -> tuple[dict[str, torch.Tensor], bool]:
    """``update`` moved back towards ``reference`` until its change is within ``bound`` (with ``stats_share``,
    as :func:`clip_factors` says); and whether the change was within it to begin with (the bit adaptive
    clipping counts)."""
    floats = [k for k, v in update.items() if v.is_floating_point()]
    change = {k: update[k] - reference[k] for k in floats}
    weights, stats, within = clip_factors(change, bound, stats_share)
    clipped = dict(update)
    for key in floats:
        factor = stats if is_statistic(key) else weights
        if factor < 1:
            clipped[key] = reference[key] + change[key].mul_(factor)
    return clipped, within


def adaptive_noise(noise_multiplier: float, count_stddev: float) -> float:
    """The update's noise multiplier when the count of unclipped updates is noised too, so that both together
    are one Gaussian mechanism of ``noise_multiplier`` (Andrew et al. 2021, Theorem 1)."""
    if noise_multiplier == 0:
        return 0.0
    if noise_multiplier >= 2 * count_stddev:
        raise ConfigError(
            f"privacy.count_stddev = {count_stddev:g} leaves no noise for the updates at noise multiplier "
            f"{noise_multiplier:.3g}: it must be above {noise_multiplier / 2:.3g}"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


# clip_advice: rounds at the end whose noised unclipped share is averaged (one round's is noisy).
ADVICE_ROUNDS = 3


@dataclass
class Sampling:
    """How a round's clients are drawn, as the accountant assumes: each client of ``population`` with
    probability ``rate`` (poisson), or exactly ``size`` of them (fixed)."""

    kind: str
    population: int
    size: int

    @property
    def rate(self) -> float:
        return self.size / self.population

    def event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
        import dp_accounting  # see Accountant.fresh

        if self.kind == "poisson":
            gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
            return dp_accounting.PoissonSampledDpEvent(self.rate, gaussian)
        # Replacing one client changes the sum of clipped updates by up to twice the bound.
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
        return dp_accounting.SampledWithoutReplacementDpEvent(self.population, self.size, gaussian)


class Accountant:
    """Epsilon at delta after a number of noised rounds, each the same sampled Gaussian mechanism."""

    def __init__(self, p: PrivacyConfig, sampling: Sampling) -> None:
        self.p = p
        self.sampling = sampling
        # A round asks for the same figure up to three times (may it run, is it the last to evaluate, what
        # did it spend), and PLD takes seconds for each: each (noise multiplier, rounds) is computed once.
        self._spent: dict[tuple[float, int], float] = {}

    def fresh(self) -> dp_accounting.PrivacyAccountant:
        # Imported here, not with the module: dp_accounting loads scipy's signal and stats packages (about
        # 2 s), which every client process (it only clips) and every run without privacy would pay for.
        from dp_accounting import NeighboringRelation, pld, rdp

        poisson = self.sampling.kind == "poisson"
        relation = NeighboringRelation.ADD_OR_REMOVE_ONE if poisson else NeighboringRelation.REPLACE_ONE
        if self.p.accountant == "pld":
            return pld.PLDAccountant(relation)
        return rdp.RdpAccountant(neighboring_relation=relation)

    def epsilon(self, noise_multiplier: float, rounds: int) -> float:
        if rounds == 0:
            return 0.0
        if noise_multiplier == 0:
            return math.inf
        if (noise_multiplier, rounds) not in self._spent:
            accountant = self.fresh()
            with _quiet_rdp():
                accountant.compose(self.sampling.event(noise_multiplier), rounds)
                self._spent[noise_multiplier, rounds] = float(accountant.get_epsilon(self.p.delta))
        return self._spent[noise_multiplier, rounds]

    def solve(self, target_epsilon: float, rounds: int) -> float:
        """The smallest noise multiplier whose ``rounds`` rounds stay within ``target_epsilon``."""
        import dp_accounting  # see fresh

        with _quiet_rdp():
            return float(
                dp_accounting.calibrate_dp_mechanism(
                    self.fresh,
                    lambda sigma: dp_accounting.SelfComposedDpEvent(self.sampling.event(sigma), rounds),
                    target_epsilon,
                    self.p.delta,
                    dp_accounting.ExplicitBracketInterval(1e-3, 1e4),
                )
            )


@contextmanager
def _quiet_rdp() -> Iterator[None]:
    """dp_accounting's RDP series does not converge for a few fractional orders at some sampling rates and
    noise multipliers (q = 0.1 and sigma 0.68, for one); it leaves those orders out, its bound staying valid,
    and warns for each order at every count of rounds asked: screenfuls per run that change no figure."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


@dataclass
class PrivateSum:
    """One round's clipped changes, summed per tensor, and the count of those the bound left whole."""

    bound: float
    stats_share: float = 1.0  # privacy.stats_share: see clip_factors
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    # The round's reference in float64, made once: every client's update is measured from the same tensors.
    reference64: dict[str, torch.Tensor] = field(default_factory=dict)
    integers: RunningMean = field(default_factory=RunningMean)
    unclipped: int = 0
    clients: int = 0

    def add(
        self,
        tensors: dict[str, torch.Tensor],
        reference: dict[str, torch.Tensor],
        unclipped: bool,
        samples: int,
    ) -> None:
        """Fold in one client's update of the tensors in ``reference``, clipped here again; ``unclipped``: the
        client's word that its own clipping left the update whole."""
        floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
        change = {}
        for key, value in floats.items():
            if key not in self.reference64:
                self.reference64[key] = reference[key].double()
            change[key] = value.to(torch.float64, copy=True).sub_(self.reference64[key])
        weights, stats, within = clip_factors(change, self.bound, self.stats_share)
        # Scaled into the sums in place: at 1,000 clients a round of 1.6 M values, the copies that scaling and
        # summing made took a fifth of the round.
        for key, value in change.items():
            factor = stats if is_statistic(key) else weights
            if key in self.sums:
                self.sums[key].add_(value, alpha=factor)
            else:
                self.sums[key] = value.mul_(factor)
        others = {k: v for k, v in tensors.items() if k not in floats}
        if others:
            self.integers.add(others, samples)
        # A client that did not clip its own update (or says so wrongly) is counted by what arrived.
        self.unclipped += bool(unclipped and within)
        self.clients += 1

    def add_sum(
        self,
        changes: dict[str, torch.Tensor],
        integers: dict[str, torch.Tensor],
        clients: int,
        unclipped: int,
    ) -> None:
        """Fold in the sum of ``clients`` changes that a secure aggregation gave (clipped by the clients
        themselves), the mean of their integer buffers and the count the bound left whole."""
        for key, value in changes.items():
            value = value.double()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        if integers:
            self.integers.add(integers, clients)
        self.unclipped += unclipped
        self.clients += clients


class Privacy:
    """The server's side of DP-FedAvg: sampling, the bound, the noise, and the accountant's round count (all
    in the checkpoint, so a resumed run draws the same noise and reports the same epsilon)."""

    def __init__(self, cfg: Config) -> None:
        p = cfg.privacy
        self.p = p
        self.cfg = cfg
        simulated = cfg.run.engine != "flower"
        self.seeded = p.noise_source == "seeded" or (p.noise_source == "auto" and simulated)
        self.bound = p.clip
        self.rounds = 0  # noised aggregates released
        self.noise_multiplier = p.noise_multiplier  # solved by bind() under target_epsilon
        self.accountant: Accountant | None = None
        self.unclipped_shares: list[float] = []  # adaptive: each round's noised share (released, so public)

    def bind(self, population: int, planned_rounds: int) -> None:
        """Set the accountant for the clients that could be set up (``population``); solve the noise for
        ``planned_rounds`` rounds under privacy.target_epsilon."""
        fed = self.cfg.federation
        size = min(fed.clients_per_round or population, population)
        if self.p.sampling == "poisson":
            # Each client joins with probability clients_per_round / num_clients, however many are set up.
            population, size = fed.num_clients, fed.clients_per_round or fed.num_clients
        self.accountant = Accountant(self.p, Sampling(self.p.sampling, population, size))
        if self.p.target_epsilon:
            self.noise_multiplier = self.accountant.solve(self.p.target_epsilon, planned_rounds)

    @property
    def rate(self) -> float:
        assert self.accountant is not None
        return self.accountant.sampling.rate

    def sample(self, pool: list[int], rng: Any) -> list[int]:
        """This round's clients: each of ``pool`` with the sampling rate (poisson), or a fixed-size draw."""
        if self.p.sampling == "poisson":
            return [c for c, u in zip(pool, rng.random(len(pool)), strict=True) if u < self.rate]
        size = self.accountant.sampling.size if self.accountant else len(pool)
        if size >= len(pool):
            return pool
        return sorted(int(c) for c in rng.choice(pool, size=size, replace=False))

    def epsilon(self, rounds: int | None = None) -> float:
        assert self.accountant is not None
        return self.accountant.epsilon(self.noise_multiplier, self.rounds if rounds is None else rounds)

    def affords(self, rounds: int) -> bool:
        """Whether ``rounds`` noised rounds stay within privacy.max_epsilon (always, without a cap)."""
        return not self.p.max_epsilon or self.epsilon(rounds) <= self.p.max_epsilon

    @property
    def count_stddev(self) -> float:
        return self.p.count_stddev or self.rate * self.accountant.sampling.population / 20

    @property
    def update_noise(self) -> float:
        """The noise multiplier on the updates' sum (all of it with a fixed bound)."""
        if self.p.clipping == "fixed":
            return self.noise_multiplier
        return adaptive_noise(self.noise_multiplier, self.count_stddev)

    def start(self) -> PrivateSum:
        return PrivateSum(self.bound, self.p.stats_share)

    def finish(
        self, acc: PrivateSum, reference: dict[str, torch.Tensor], holders: dict[str, int], seed: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The new values of the round's tensors: ``reference`` plus the noised sum over each tensor's
        expected number of contributions (the sampling rate x ``holders``, the clients whose slice holds it);
        and what the round records of privacy. ``seed`` draws the noise when it is seeded."""
        generator = torch.Generator().manual_seed(seed if self.seeded else secrets.randbits(63))
        std = self.update_noise * acc.bound
        out: dict[str, torch.Tensor] = {}
        for key, ref in reference.items():
            if not ref.is_floating_point():
                continue
            total = acc.sums.get(key, torch.zeros(ref.shape, dtype=torch.float64))
            if std:
                total = total + torch.randn(ref.shape, generator=generator, dtype=torch.float64) * std
            expected = self.rate * holders.get(key, 0)
            if expected > 0:
                out[key] = (ref.double() + total / expected).to(ref.dtype)
                if key.endswith("running_var"):
                    # Noise can push a BatchNorm variance below zero, and every later forward pass to NaN
                    # (the clients' next updates were all rejected as non-finite). Flooring the released
                    # value is post-processing: it costs no privacy.
                    out[key].clamp_(min=0)
        if acc.integers.sums:
            out.update(acc.integers.result())
        self.rounds += 1
        record: dict[str, Any] = {
            "epsilon": self.epsilon(),
            "clip": acc.bound,
            "noise_std": std,
        }
        if self.p.clipping == "adaptive":
            # The count of updates the bound left whole, noised, over the expected number of clients.
            expected_clients = self.rate * self.accountant.sampling.population
            noised = acc.unclipped + float(torch.randn((), generator=generator)) * self.count_stddev
            fraction = noised / expected_clients
            self.bound = acc.bound * math.exp(-self.p.clip_lr * (fraction - self.p.target_quantile))
            record["unclipped_fraction"] = fraction
            self.unclipped_shares.append(fraction)
        return out, record

    def clip_advice(self) -> str:
        """One line when the adaptive bound was still far from the updates' norms at the end. Far below: each
        round moved the model by at most the bound, and a bound started far too low (0.1 against the norms of
        5 of frozen's updates on Tux Paint) leaves the model where it started even without noise. Far above:
        the noise, which scales with the bound, drowned updates much smaller than it (LW on emoji from 4,
        against norms of 0.2-1.3: the bound shrinks by a factor of about exp(-clip_lr / 2) a round and was
        still above them after 12). From the noised shares the run released: saying it costs no privacy."""
        last = self.unclipped_shares[-ADVICE_ROUNDS:]
        if len(last) < ADVICE_ROUNDS:
            return ""
        share, target = sum(last) / len(last), self.p.target_quantile
        if share < target / 4:
            where = "still clipped nearly every"
            cost = "each round moved the model by at most the bound"
        elif share > 1 - (1 - target) / 4:
            where = "stayed above nearly every"
            cost = "the noise, which scales with the bound, was larger than the updates needed"
        else:
            return ""
        return (
            f"the adaptive clipping bound ({self.bound:.3g} at the end, from {self.p.clip:g}) {where} update "
            f"in the last {ADVICE_ROUNDS} rounds (noised unclipped share {share:.2f}, target {target:g}), so "
            f"{cost}: start privacy.clip nearer the updates' norms or raise privacy.clip_lr"
        )

    def describe(self) -> dict[str, Any]:
        """The run's privacy settings and guarantee so far, for summary.json and the report."""
        assert self.accountant is not None
        sampling = self.accountant.sampling
        return {
            "epsilon": self.epsilon(),
            "delta": self.p.delta,
            "noise_multiplier": self.noise_multiplier,
            "update_noise_multiplier": self.update_noise,
            "clipping": self.p.clipping,
            "clip": self.p.clip,
            "final_clip": self.bound,
            "stats_share": self.p.stats_share,
            "sampling": sampling.kind,
            "sampling_rate": sampling.rate,
            "population": sampling.population,
            "rounds": self.rounds,
            "accountant": self.p.accountant,
            "noise_source": "seeded" if self.seeded else "system",
            **({"clip_advice": advice} if (advice := self.clip_advice()) else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "bound": self.bound, "unclipped_shares": self.unclipped_shares}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds, self.bound = int(state["rounds"]), float(state["bound"])
        self.unclipped_shares = [float(x) for x in state.get("unclipped_shares", [])]  # older checkpoints
