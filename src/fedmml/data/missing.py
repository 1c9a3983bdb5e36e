"""Incomplete multimodal data, simulated from complete pairs: samples that lack a modality, and clients whose
samples hold one modality only.

- ``data.missing_rate.<m>``: the fraction of each client's training samples that lack ``m``. The draws of
  different modalities are disjoint, so every sample keeps at least one modality.
- ``data.unimodal_clients.<m>``: the fraction of clients whose samples hold only ``m``.
- ``data.incomplete``: ``use`` trains on the incomplete samples too; ``drop`` trains on complete pairs only,
  the baseline that discards them (a unimodal client then holds nothing to train on and sits out). What an
  incomplete sample trains: in the image + audio classifier, the fusion and its present tower, with a learned
  "missing" embedding in place of the absent projection; in the image-text dual encoder, its present tower
  through a unimodal contrastive term between two views of it (``model.unimodal_weight``).

Every draw depends on ``run.seed``, the client id and a sample's position in its client's share only, so a
run draws the same samples on every engine and in every process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmml.config import Config

_SAMPLES, _CLIENTS, _TEST = 0x6D697373, 0x756E696D, 0x74657374  # stream tags of the three kinds of draw


def incomplete(cfg: Config) -> bool:
    """Whether the run simulates incomplete data (a classifier then holds learned "missing" embeddings)."""
    d = cfg.data
    return any(v > 0 for v in (*d.missing_rate.values(), *d.unimodal_clients.values()))


def unimodal_roles(cfg: Config) -> dict[int, str]:
    """Client id -> the one modality its samples hold, for the seeded ``data.unimodal_clients`` shares."""
    fractions = cfg.data.unimodal_clients
    n = cfg.federation.num_clients
    order = np.random.default_rng([cfg.run.seed, _CLIENTS]).permutation(n)
    roles: dict[int, str] = {}
    start = 0
    for modality in cfg.model.modalities:
        count = round(fractions.get(modality, 0.0) * n)
        roles.update({int(c): modality for c in order[start : start + count]})
        start += count
    return roles


def _disjoint(rates: dict[str, float], modalities: tuple[str, ...], n: int, rng: np.random.Generator):
    present = {m: np.ones(n, dtype=bool) for m in modalities}
    order = rng.permutation(n)
    start = 0
    for modality in modalities:
        count = round(rates.get(modality, 0.0) * n)
        present[modality][order[start : start + count]] = False
        start += count
    return present


def presence(cfg: Config, cid: int, n: int) -> dict[str, np.ndarray] | None:
    """Per modality, which of client ``cid``'s ``n`` training samples hold it; None when all hold all."""
    modalities = cfg.model.modalities
    role = unimodal_roles(cfg).get(cid)
    if role is not None:
        return {m: np.full(n, m == role) for m in modalities}
    rates = cfg.data.missing_rate
    if not any(r > 0 for r in rates.values()):
        return None
    return _disjoint(rates, modalities, n, np.random.default_rng([cfg.run.seed, cid, _SAMPLES]))


def held_out_presence(cfg: Config, modality: str, rate: float, n: int) -> dict[str, np.ndarray]:
    """A seeded draw over ``n`` test samples in which ``rate`` of them lack ``modality``."""
    rng = np.random.default_rng([cfg.run.seed, _TEST])
    return _disjoint({modality: rate}, cfg.model.modalities, n, rng)


def robustness_conditions(cfg: Config) -> dict[str, tuple[str, float]]:
    """The robustness scores a run reports: name -> (modality missing, fraction of test samples lacking it).
    A modality with a missing rate is tested at that rate; under unimodal clients, each modality is tested
    absent from every sample (what a unimodal client's model faces)."""
    d = cfg.data
    conditions = {f"{m}_missing_{r:g}": (m, r) for m, r in d.missing_rate.items() if r > 0}
    if any(f > 0 for f in d.unimodal_clients.values()):
        conditions.update({f"{m}_missing_1": (m, 1.0) for m in cfg.model.modalities})
    return conditions


def describe(present: dict[str, np.ndarray] | None, used: bool) -> dict[str, Any]:
    """What a client reports of its incomplete samples: per modality, the samples lacking it (trained on
    when ``used``, else dropped), and the modalities it holds at all."""
    if present is None:
        return {}
    lacking = {m: int((~mask).sum()) for m, mask in present.items()}
    held = [m for m, mask in present.items() if mask.any()]
    return {
        "incomplete_samples" if used else "incomplete_dropped": lacking,
        "modalities": held,
    }
