"""Nested settings of the model. Each field's docstring becomes its ``--help`` text.

All are frozen dataclasses of plain types, validated in ``__post_init__`` so that a bad
value fails at parse time with the key that holds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

AttentionBackend = Literal["auto", "dense", "banded", "flex", "xformers", "full_sdpa", "full_eager"]
SamplerName = Literal["ancestral", "ddim", "dpm_solver++"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting with a bad value; the message starts with its key."""


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


@dataclass(frozen=True)
class AttentionConfig:
    """Longformer-style sparse self-attention."""

    window: int = 256
    """Local window: query i sees key j when |i - j| <= window // 2 (times ``dilation``)."""
    dilation: int = 1
    """Dilation of the local window: only every ``dilation``-th key inside it is seen."""
    num_global: int = 0
    """Number of leading source tokens made global, besides [CLS] and the source [SEP]."""
    target_global: bool = True
    """Make the whole target region global: every target position reads every source position in
    every layer (a long source reaches the output), at a cost linear in the source length."""
    backend: AttentionBackend = "auto"
    """Kernel: dense (reference), banded (CPU), flex, xformers (CUDA), auto (best available; on CPU
    dense up to twice the key span of a banded block, banded beyond), or
    full_sdpa / full_eager: full attention, ignoring the window (the DiffuSeq baseline)."""
    block_size: int = 64
    """Query block size of the banded backend."""

    def __post_init__(self) -> None:
        _check(self.window >= 1, "attention.window", self.window, "must be >= 1")
        _check(self.dilation >= 1, "attention.dilation", self.dilation, "must be >= 1")
        _check(self.num_global >= 0, "attention.num_global", self.num_global, "must be >= 0")
        _check(self.block_size >= 1, "attention.block_size", self.block_size, "must be >= 1")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward."""

    num_experts: int = 8
    """Experts per MoE layer; 1 with top_k 1 is a dense feed-forward."""
    top_k: int = 2
    """Experts each token is routed to."""
    expert_hidden: int = 512
    """Hidden width of each expert's MLP."""
    capacity_factor: float | None = None
    """None: dropless. Else each expert takes at most capacity_factor * tokens * top_k / experts slots."""
    jitter: float = 0.0
    """Multiplicative uniform noise on router inputs during training (0 disables)."""
    load_balance_coef: float = 0.01
    """Weight of the load-balance loss E * sum_e f_e P_e."""
    z_loss_coef: float = 1e-3
    """Weight of the router z-loss mean(logsumexp(logits)^2)."""
    moe_layers: list[int] | None = None
    """Indices of the blocks that use MoE; None means every block. Others use a dense FFN."""
    dispatch: Literal["sorted", "looped"] = "sorted"
    """Expert dispatch: sorted (grouped contiguous matmuls) or looped (the reference)."""
    shared_expert: bool = False
    """Add one shared expert that every token uses (DeepSeek-style)."""

    def __post_init__(self) -> None:
        _check(self.num_experts >= 1, "moe.num_experts", self.num_experts, "must be >= 1")
        _check(
            1 <= self.top_k <= self.num_experts,
            "moe.top_k",
            self.top_k,
            f"must be in [1, num_experts={self.num_experts}]",
        )
        _check(self.expert_hidden >= 1, "moe.expert_hidden", self.expert_hidden, "must be >= 1")
        _check(
            self.capacity_factor is None or self.capacity_factor > 0,
            "moe.capacity_factor",
            self.capacity_factor,
            "must be None or > 0",
        )
        _check(self.jitter >= 0, "moe.jitter", self.jitter, "must be >= 0")


# Longest source that ``loss_on: auto`` still scores: DiffuSeq's own limit (BERT's 512 positions).
LONG_SOURCE_TOKENS = 512


def resolve_loss_on(loss_on: str, max_src_len: int | None) -> Literal["all", "target"]:
    """The positions scored for ``diffusion.loss_on`` at this source length (auto resolved)."""
    if loss_on == "auto":
        if max_src_len is None:
            raise ValueError("diffusion.loss_on=auto needs max_src_len (set by the data module's setup)")
        return "all" if max_src_len <= LONG_SOURCE_TOKENS else "target"
    return loss_on  # type: ignore[return-value]


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward process and training loss."""

    steps: int = 2000
    """Number of diffusion steps T."""
    schedule: Literal["sqrt", "cosine", "linear"] = "sqrt"
    """Noise schedule alpha_bar(t)."""
    soft_absorbing: bool = True
    """Use DiffuSeq-v2's learned soft absorbing state m; False gives plain DiffuSeq."""
    denoise_rate: float = 0.5
    """gamma: a target token is replaced by m with probability gamma * sqrt(1 - alpha_bar_t)."""
    denoise_warmup_steps: int = 0
    """Optimizer steps over which gamma ramps linearly from 0 to ``denoise_rate`` (0: full gamma from
    the first step). Validation always scores with the full gamma."""
    absorb_padding: bool = False
    """Let m replace the [PAD] positions of the target region too (DiffuSeq-v2 replaces any target
    position). Off by default: a denoiser that learns "m means [PAD]" predicts [PAD] on word positions
    more often, and its samples come out short (dialogue, whose targets are two-thirds padding: 0.5-0.7x
    the words at gamma <= 0.03). Off, m stands for a hidden text token and the length is left to the
    continuous process, as in DiffuSeq."""
    mask_reg_coef: float = 0.01
    """Weight of the regulariser ||m||_2 on the absorbing state."""
    loss_on: Literal["auto", "all", "target"] = "auto"
    """Positions scored by the mse and rounding losses: all (DiffuSeq parity), target only, or
    auto: all for sources up to 512 tokens (DiffuSeq's own range), target for longer ones (scoring
    a long source costs a (source, vocabulary) logits tensor per example and every step)."""
    timestep_sampler: Literal["uniform", "loss_aware", "high_noise"] = "uniform"
    """How training timesteps are drawn: uniform; loss_aware (the second-moment resampler, importance
    weighted); high_noise (p_t proportional to t + 1, unweighted: more training where noise is high)."""
    x0_nll_coef: float = 0.0
    """Weight of a cross-entropy of the rounding head on x0_hat at the target's positions (0: off, as
    DiffuSeq): it scores the token the denoiser writes, where the mse scores an embedding distance."""
    skip_connection: bool = False
    """Predict x0 as m + sqrt(ab_t) (z_t - m) + sqrt(1 - ab_t) F(z_t): the best linear guess plus a
    learned residual (EDM-style preconditioning). False: the network's output is x0 (DiffuSeq)."""
    self_conditioning: float = 0.0
    """Self-conditioning (Analog Bits): the share of training examples whose denoiser also reads its
    own first x0 estimate, as each sampling step reads the previous one's; 0 turns it off (and the
    network has no such input)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 2, "diffusion.steps", self.steps, "must be >= 2")
        _check(0.0 <= self.denoise_rate <= 1.0, "diffusion.denoise_rate", self.denoise_rate, "must be in [0, 1]")
        _check(self.denoise_warmup_steps >= 0, "diffusion.denoise_warmup_steps", self.denoise_warmup_steps, "must be >= 0")
        _check(self.mask_reg_coef >= 0, "diffusion.mask_reg_coef", self.mask_reg_coef, "must be >= 0")
        _check(0.0 <= self.self_conditioning <= 1.0, "diffusion.self_conditioning", self.self_conditioning,
               "must be in [0, 1]")
        _check(self.x0_nll_coef >= 0, "diffusion.x0_nll_coef", self.x0_nll_coef, "must be >= 0")
        _check(self.loss_on in ("auto", "all", "target"), "diffusion.loss_on", self.loss_on, "expected auto, all or target")


# How a sample becomes text (moe_diffuseq.batch.decode_targets).
DECODE_MODES = ("strip", "truncate")


@dataclass(frozen=True)
class SamplingConfig:
    """Defaults of ``generate`` and of validation-time samples."""

    sampler: SamplerName = "dpm_solver++"
    """Sampler: ancestral (all T steps, the reference), ddim or dpm_solver++."""
    steps: int = 20
    """Sampling steps for ddim and dpm_solver++ (ancestral always uses T)."""
    spacing: Literal["time_uniform", "logsnr"] = "logsnr"
    """How the sampling timesteps are spread over [0, T)."""
    clamp: bool = False
    """Snap each predicted x0 to its nearest word embedding."""
    num_candidates: int = 1
    """Seeds per source; more than 1 picks one by MBR with sentence-BLEU."""
    batch_size: int = 16
    """Sources sampled together."""
    decode: Literal["strip", "truncate"] = "strip"
    """Sample to text: strip drops every [SEP] and [PAD] and keeps the other tokens (DiffuSeq's
    evaluation); truncate stops at the first [SEP] or [PAD]."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "sampling.steps", self.steps, "must be >= 1")
        _check(self.num_candidates >= 1, "sampling.num_candidates", self.num_candidates, "must be >= 1")
        _check(self.batch_size >= 1, "sampling.batch_size", self.batch_size, "must be >= 1")
        _check(self.decode in DECODE_MODES, "sampling.decode", self.decode, f"expected one of {DECODE_MODES}")


def coerce(cls: type[T], value: T | dict[str, Any] | None, key: str) -> T:
    """Accept a config object, a plain dict (as stored in a checkpoint) or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{key}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**value)
    raise TypeError(f"{key}: expected {cls.__name__} or dict, got {type(value).__name__}")


def to_plain(config: Any) -> dict[str, Any]:
    """A config as a dict of plain types, for hyperparameters and checkpoints."""
    return asdict(config)
