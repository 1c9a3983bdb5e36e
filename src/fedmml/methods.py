"""The three training methods: what each stage grows, trains, freezes and exchanges.

- ``e2e`` (FedMML): one stage at full depth, everything trainable, the schedule's total round budget.
- ``lw`` (LW-FedMML): each stage appends blocks and freezes everything earlier. Trainable: the new blocks,
  every encoder's final norm and neck, the heads, and the stems in the first stage only.
- ``prog`` (Prog-FedMML): the same growth, nothing frozen.
- ``frozen`` (reference row): e2e's single full-depth stage with the encoders exactly as pretrained (stems,
  blocks and final norms frozen); only the necks and the heads train and travel. What the encoders give
  untouched.
- ``centralized`` (reference row): e2e on one client holding all the training data (see
  :func:`centralize`), the upper bound that federation is measured against.
- ``lora`` (reference row): e2e's single full-depth stage with LoRA adapters on every encoder block
  (:mod:`fedmml.models.lora`); the adapters, the final norms, the necks and the heads train and travel, the
  pretrained weights stay frozen (FLoRA-style federated LoRA: fewer bytes, but still a backward pass
  through the whole depth).
- ``hetero``: LW's and Prog's growth, each client training the deepest slice its memory budget fits — Prog's
  (every block), LW's (the new blocks, norms, necks and heads) or the heads only — in one federation
  (:mod:`fedmml.federation.budgets`). Here it is the widest slice, Prog's; the server narrows it per client.

Both the server and the clients derive the trainable set from this module, so they can never disagree on
what is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedmml.config import METHODS, Config, ConfigError, Schedule, config_from_dict

ENCODER_PREFIX = "encoders."
LORA_MARK = ".lora_"  # in the state-dict key of every LoRA adapter weight (see fedmml.models.lora)
# Methods that train the final architecture from round 1 in one stage.
FULL_DEPTH = ("e2e", "frozen", "centralized", "lora")


@dataclass(frozen=True)
class Stage:
    """One stage of a run: how deep each encoder is, which blocks are new, rounds and learning rates."""

    index: int
    rounds: int
    depth: dict[str, int]
    new_blocks: dict[str, tuple[int, ...]]
    lr: dict[str, float]


def plan_stages(schedule: Schedule, method: str, total_blocks: dict[str, int]) -> list[Stage]:
    """Turn a schedule into the stages a method runs; errors before training if it cannot fit the encoders."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
    for modality, per_stage in schedule.blocks.items():
        wanted = sum(per_stage)
        if wanted > total_blocks[modality]:
            raise ConfigError(
                f"the schedule adds {wanted} {modality} blocks, but the {modality} encoder has only "
                f"{total_blocks[modality]}"
            )
        if wanted == 0:
            raise ConfigError(f"the schedule adds no {modality} blocks")
    final_depth = {m: sum(b) for m, b in schedule.blocks.items()}
    if method in FULL_DEPTH:
        # The baseline trains the final architecture from round 1 at the last stage's learning rates.
        lr = {group: rates[-1] for group, rates in schedule.lr.items()}
        new = {m: tuple(range(d)) for m, d in final_depth.items()}
        return [Stage(0, sum(schedule.rounds), final_depth, new, lr)]
    stages = []
    depth = dict.fromkeys(schedule.blocks, 0)
    for i, rounds in enumerate(schedule.rounds):
        new = {m: tuple(range(depth[m], depth[m] + schedule.blocks[m][i])) for m in depth}
        depth = {m: depth[m] + schedule.blocks[m][i] for m in depth}
        lr = {group: rates[i] for group, rates in schedule.lr.items()}
        stages.append(Stage(i, rounds, dict(depth), new, lr))
    return stages


def trainable_prefixes(model: nn.Module, method: str, stage: Stage) -> list[str]:
    """State-dict prefixes (module paths ending in '.') or exact names that are trained in ``stage``."""
    prefixes = []
    for modality, encoder in model.encoders.items():
        root = f"{ENCODER_PREFIX}{modality}."
        if method == "frozen":
            prefixes.append(root + "neck.")
            continue
        prefixes += [root + "norm.", root + "neck."]
        if method == "lora":
            prefixes.append(LORA_MARK)  # the adapters of every block (matched anywhere in a key)
            continue
        if method != "lw" or stage.index == 0:
            prefixes.append(root + "stem.")
        blocks = stage.new_blocks[modality] if method == "lw" else range(encoder.depth)
        prefixes += [f"{root}blocks.{j}." for j in blocks]
    # Everything outside the encoders (heads, prediction head, learnable temperature) trains in every stage.
    for name, _ in model.named_children():
        if name != "encoders":
            prefixes.append(name + ".")
    prefixes += [name for name, _ in model.named_parameters(recurse=False)]
    return prefixes


def without_towers(keys: list[str], absent: list[str]) -> list[str]:
    """``keys`` less the encoder and projection head of each ``absent`` modality: what a client whose data
    holds none of those modalities trains and sends (it cannot change them)."""
    roots = tuple(f"{root}{m}." for m in absent for root in (ENCODER_PREFIX, "heads."))
    return [k for k in keys if not k.startswith(roots)]


def _matches(key: str, prefixes: list[str]) -> bool:
    return any(
        key == p or (p.endswith(".") and key.startswith(p)) or (p == LORA_MARK and LORA_MARK in key)
        for p in prefixes
    )


def trainable_keys(model: nn.Module, method: str, stage: Stage) -> list[str]:
    """State-dict keys (parameters and buffers) that are trained and exchanged every round of ``stage``."""
    prefixes = trainable_prefixes(model, method, stage)
    return [k for k in model.state_dict() if _matches(k, prefixes)]


def configure(model: nn.Module, method: str, stage: Stage) -> list[str]:
    """Set ``requires_grad`` for ``stage`` and return the trainable state-dict keys."""
    prefixes = trainable_prefixes(model, method, stage)
    for name, param in model.named_parameters():
        param.requires_grad_(_matches(name, prefixes))
    return [k for k in model.state_dict() if _matches(k, prefixes)]


def frozen_modules(model: nn.Module, method: str, stage: Stage) -> list[nn.Module]:
    """Encoder stems and blocks that are frozen in ``stage``."""
    prefixes = trainable_prefixes(model, method, stage)
    frozen = []
    for modality, encoder in model.encoders.items():
        root = f"{ENCODER_PREFIX}{modality}."
        parts = [("stem.", encoder.stem)] + [(f"blocks.{j}.", b) for j, b in enumerate(encoder.blocks)]
        frozen += [module for path, module in parts if root + path not in prefixes]
    return frozen


def set_train_mode(model: nn.Module, method: str, stage: Stage) -> None:
    """Train mode for trainable parts; eval mode for frozen ones (no dropout, fixed norm statistics)."""
    model.train()
    for module in frozen_modules(model, method, stage):
        module.eval()
    if method == "frozen":
        for encoder in model.encoders.values():
            encoder.norm.eval()


def centralize(cfg: Config) -> Config:
    """``centralized``'s federation: one client, sampled every round, holding the whole training split of a
    shared dataset, without a memory budget; the schedule (rounds x local epochs) and everything else as
    configured."""
    if cfg.run.method != "centralized":
        return cfg
    if cfg.partition.kind == "local":
        raise ConfigError("run.method centralized needs one shared dataset, not partition.kind local")
    raw = cfg.to_dict()
    # The upper bound is one machine, not a device: no memory budget.
    federation = {
        **raw["federation"],
        "num_clients": 1,
        "clients_per_round": 0,
        "min_clients": 1,
        "client_memory_mib": 0.0,
    }
    partition = {**raw["partition"], "kind": "iid"}
    return config_from_dict({**raw, "federation": federation, "partition": partition})


def param_group(name: str) -> str:
    """Learning-rate group of a parameter: ``image``, ``text`` (or another modality) or ``heads``."""
    if name.startswith(ENCODER_PREFIX):
        return name.split(".")[1]
    return "heads"
