"""Nested settings of the model. Each field's docstring becomes its ``--help`` text.

All are frozen dataclasses of plain types, validated in ``__post_init__`` so that a bad
value fails at parse time with the key that holds it.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

AttentionBackend = Literal["auto", "dense", "banded", "flex", "xformers", "full_sdpa", "full_eager"]
SamplerName = Literal["ancestral", "ddim", "dpm_solver++", "sde_dpm_solver++"]
PositionMode = Literal["target_relative", "target_anchored", "absolute"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting with a bad value; the message starts with its key."""


def config_error_behind(err: BaseException) -> BaseException:
    """The ConfigError behind a parser's error, when there is one: it names the key and the rule
    (jsonargparse wraps it in a list of every type it tried)."""
    seen: BaseException | None = err
    while seen is not None and not isinstance(seen, ConfigError):
        seen = seen.__cause__ or seen.__context__
    return seen or err


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


@functools.cache
def _choices(cls: type) -> dict[str, tuple]:
    """The fields of ``cls`` typed as a Literal, with their choices."""
    return {name: get_args(hint) for name, hint in get_type_hints(cls).items()
            if get_origin(hint) is Literal}


def _check_choices(config: Any, prefix: str) -> None:
    """Each Literal field holds one of its choices: the parser checks them on the command line,
    but a Python call or a checkpoint's hyperparameters reach the dataclass unchecked."""
    for name, choices in _choices(type(config)).items():
        value = getattr(config, name)
        _check(value in choices, f"{prefix}.{name}", value, f"expected one of {list(choices)}")


@dataclass(frozen=True)
class AttentionConfig:
    """Longformer-style sparse self-attention."""

    window: int = 256
    """Local window: query i sees key j when |i - j| <= window // 2 (times ``dilation``)."""
    dilation: int = 1
    """Dilation of the local window: only every ``dilation``-th key inside it is seen."""
    num_global: int = 0
    """Number of leading source tokens made global, besides [CLS] and the source [SEP]."""
    num_global_last: int = 0
    """Number of trailing source tokens (those just before the source [SEP]) made global, as
    Longformer makes a question global: a question written after a long document (code-lookup's
    ``# signature of NAME``) is read by every source position, and reads every one, per layer."""
    target_global: bool = True
    """Make the whole target region global: every target position reads every source position in
    every layer (a long source reaches the output), at a cost linear in the source length."""
    target_keys: bool = False
    """With target_global: make the target region global keys too, so every source position also
    reads the whole target (global both ways). False: global rows only (the target reads the whole
    source, the source reads its window), a cost of window + target per source position; it learns
    as well as both ways and costs less at long sources (docs/long-documents.md)."""
    backend: AttentionBackend = "auto"
    """Kernel: dense (reference), banded (CPU), flex, xformers (CUDA), auto (best available; on CPU
    dense up to 512 tokens or twice the key span of a banded block, banded beyond), or
    full_sdpa / full_eager: full attention, ignoring the window (the DiffuSeq baseline)."""
    block_size: int = 64
    """Query block size of the banded backend."""

    def __post_init__(self) -> None:
        _check_choices(self, "network.attention")
        _check(self.window >= 1, "network.attention.window", self.window, "must be >= 1")
        _check(self.dilation >= 1, "network.attention.dilation", self.dilation, "must be >= 1")
        _check(self.num_global >= 0, "network.attention.num_global", self.num_global,
               "must be >= 0")
        _check(self.num_global_last >= 0, "network.attention.num_global_last",
               self.num_global_last, "must be >= 0")
        _check(self.block_size >= 1, "network.attention.block_size", self.block_size,
               "must be >= 1")


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
    """None: dropless. Else each expert takes at most capacity_factor * tokens * top_k / experts
    slots."""
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
    routed_scale: float = 1.0
    """Factor on the routed experts' weighted sum, whose top_k weights sum to 1 (DeepSeek-V2's
    routed scaling factor). top_k makes k experts of about equal weight add up as one FFN of
    top_k * expert_hidden would, instead of averaging to 1 / top_k of its output."""

    def __post_init__(self) -> None:
        _check_choices(self, "network.moe")
        _check(self.num_experts >= 1, "network.moe.num_experts", self.num_experts, "must be >= 1")
        _check(
            1 <= self.top_k <= self.num_experts,
            "network.moe.top_k",
            self.top_k,
            f"must be in [1, num_experts={self.num_experts}]",
        )
        _check(self.expert_hidden >= 1, "network.moe.expert_hidden", self.expert_hidden,
               "must be >= 1")
        _check(
            self.capacity_factor is None or self.capacity_factor > 0,
            "network.moe.capacity_factor",
            self.capacity_factor,
            "must be None or > 0",
        )
        _check(self.jitter >= 0, "network.moe.jitter", self.jitter, "must be >= 0")
        _check(self.routed_scale > 0, "network.moe.routed_scale", self.routed_scale, "must be > 0")


@dataclass(frozen=True)
class NetworkConfig:
    """The denoiser's shape, passed whole to ``Denoiser``."""

    vocab_size: int | None = None
    """Vocabulary size; None: the tokenizer's (the data module's, or the checkpoint's)."""
    max_src_len: int | None = None
    """Source token budget (the CLI links it from data.max_src_len)."""
    max_trg_len: int | None = None
    """Target token budget (the CLI links it from data.max_trg_len)."""
    embed_dim: int = 128
    """Width of the word embedding that is diffused (DiffuSeq: 128)."""
    hidden_size: int = 256
    """Width of the transformer blocks."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block."""
    dropout: float = 0.1
    """Dropout rate inside the denoiser."""
    positions: PositionMode = "target_relative"
    """Position embeddings: target_relative (absolute on the source, the offset from the target
    region's start on the target, so an output slot does not move with the source's length),
    target_anchored (the same on the target; on the source the distance back from the target's
    start, so the source's end, where a question stands, keeps its rows at any source length and a
    model trained on short sources reads long ones) or absolute (DiffuSeq's single table)."""
    source_pointer: bool = False
    """A pointer-generator head: each target position's x0 is a learned gate's mix of the network's
    output and an attention over the source's own input embeddings, so a source token can be
    written by pointing at it instead of being carried through every layer."""
    pointer_neighbours: bool = False
    """The pointer also matches each target slot's neighbours (as the noisy input holds them) with
    each source token's neighbours, so a slot can continue a span its neighbour has copied.
    Needs source_pointer."""
    pointer_neighbour_gate: bool = False
    """Scale each side's neighbour match by a learned gate of the slot's hidden state, which reads
    the noise level: at high noise a slot's neighbours in z_t are noise, and their match only adds
    noise to where the pointer points. Needs pointer_neighbours."""
    pointer_span: int = 0
    """The pointer's score of a slot for a source token also adds (with learned weights) the scores
    of the up to ``pointer_span`` slots on each side for the tokens as far from it on the same
    side, so the slots of a copied span agree on where it lies; 0 turns it off. Needs
    source_pointer."""
    pointer_span_dropout: float = 0.0
    """In training, the fraction of examples whose pointer leaves the spans out, so each slot also
    learns to find its token on its own (a question's NAME) instead of only agreeing with its
    neighbours on a line's shape; sampling always uses the spans."""
    pointer_coverage: bool = False
    """The pointer points twice: the second time a slot's score for a source token also counts how
    closely the slots before it, and those after it, drafted that token in the first (learned
    weights of the slot's hidden state), so a list of first occurrences can tell a token it
    already wrote from one still missing (coverage, over token identities). It counts tokens, not
    items, so names that share subwords count as written: for answers that list distinct source
    tokens (a scene's speakers). Needs source_pointer."""
    short_conv: int = 0
    """Width (odd) of a depthwise convolution over the sequence, added to the blocks' input: each
    position also carries its neighbours' tokens into the first layer, so attention can find a
    token by what stands beside it ("the name after 'signature of'") in one hop instead of
    learning a previous-token head first (the short convolutions of H3, Mamba and Canon layers);
    0 turns it off."""
    position_init_std: float = 1.0
    """Standard deviation of the position tables' initial weights: 1.0 is nn.Embedding's; 0.02 is
    BERT's and DiffuSeq's, under which the positions do not outweigh the token signal of the up
    projection (content is learned sooner, a fixed-position copy later)."""
    ffn_hidden: int | None = None
    """Hidden width of the dense feed-forward of blocks without experts; None: moe.top_k x
    moe.expert_hidden, the active width of an MoE block."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Sparse attention settings."""
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    """Mixture-of-experts settings; null: a dense feed-forward (ffn_hidden wide) in every block."""

    def __post_init__(self) -> None:
        _check_choices(self, "network")
        # Nested settings may arrive as dicts (a checkpoint's hyperparameters).
        object.__setattr__(self, "attention",
                           coerce(AttentionConfig, self.attention, "network.attention"))
        if self.moe is not None:
            object.__setattr__(self, "moe", coerce(MoEConfig, self.moe, "network.moe"))
        for key in ("vocab_size", "max_src_len", "max_trg_len", "ffn_hidden"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"network.{key}", value, "must be None or >= 1")
        for key in ("embed_dim", "hidden_size", "num_layers", "num_heads"):
            _check(getattr(self, key) >= 1, f"network.{key}", getattr(self, key), "must be >= 1")
        _check(self.hidden_size % self.num_heads == 0, "network.hidden_size", self.hidden_size,
               f"must be divisible by num_heads={self.num_heads}")
        _check(0.0 <= self.dropout < 1.0, "network.dropout", self.dropout, "must be in [0, 1)")
        _check(self.source_pointer or not self.pointer_neighbours, "network.pointer_neighbours",
               self.pointer_neighbours, "needs network.source_pointer: true")
        _check(self.pointer_neighbours or not self.pointer_neighbour_gate,
               "network.pointer_neighbour_gate", self.pointer_neighbour_gate,
               "needs network.pointer_neighbours: true")
        _check(self.pointer_span >= 0, "network.pointer_span", self.pointer_span, "must be >= 0")
        _check(self.source_pointer or not self.pointer_span, "network.pointer_span",
               self.pointer_span, "needs network.source_pointer: true")
        _check(self.source_pointer or not self.pointer_coverage, "network.pointer_coverage",
               self.pointer_coverage, "needs network.source_pointer: true")
        _check(0.0 <= self.pointer_span_dropout <= 1.0, "network.pointer_span_dropout",
               self.pointer_span_dropout, "must be in [0, 1]")
        _check(self.short_conv == 0 or (self.short_conv > 0 and self.short_conv % 2 == 1),
               "network.short_conv", self.short_conv, "must be 0 (off) or an odd width >= 1")
        _check(self.position_init_std > 0, "network.position_init_std", self.position_init_std,
               "must be > 0")
        _check(self.moe is not None or self.ffn_hidden is not None, "network.ffn_hidden",
               self.ffn_hidden, "must be set when network.moe is null (every block is dense)")
        if self.moe is not None and self.moe.moe_layers is not None:
            bad = sorted(i for i in self.moe.moe_layers if not 0 <= i < self.num_layers)
            _check(not bad, "network.moe.moe_layers", self.moe.moe_layers,
                   f"{bad} outside [0, num_layers={self.num_layers})")

    @property
    def sizes_known(self) -> bool:
        """Whether the vocabulary and both length budgets are set, so the network can be built."""
        return None not in (self.vocab_size, self.max_src_len, self.max_trg_len)

    @property
    def max_length(self) -> int:
        """Longest sequence: [CLS] src [SEP] + target region (max_trg_len + 1)."""
        return self.max_src_len + self.max_trg_len + 3

    @property
    def dense_hidden(self) -> int:
        """Hidden width of a block without experts."""
        return (self.ffn_hidden if self.ffn_hidden is not None
                else self.moe.top_k * self.moe.expert_hidden)

    def routed(self, layer: int) -> bool:
        """Whether block ``layer`` has a mixture-of-experts feed-forward."""
        return self.moe is not None and (self.moe.moe_layers is None
                                         or layer in self.moe.moe_layers)


# Longest source that ``loss_on: auto`` still scores: DiffuSeq's own limit (BERT's 512 positions).
LONG_SOURCE_TOKENS = 512


def resolve_loss_on(loss_on: str, max_src_len: int | None) -> Literal["all", "target"]:
    """The positions scored for ``diffusion.loss_on`` at this source length (auto resolved)."""
    if loss_on == "auto":
        if max_src_len is None:
            raise ValueError("diffusion.loss_on=auto needs max_src_len "
                             "(set by the data module's setup)")
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
    """Optimizer steps over which gamma ramps linearly from 0 to ``denoise_rate`` (0: full gamma
    from the first step). Validation always scores with the full gamma."""
    absorb_padding: bool = False
    """Let m replace the [PAD] positions of the target region too (DiffuSeq-v2 replaces any target
    position). Off by default: a denoiser that learns "m means [PAD]" predicts [PAD] on word
    positions more often, and its samples come out short (most of all where targets are mostly
    padding). Off, m stands for a hidden text token and the length is left to the continuous
    process, as in DiffuSeq."""
    mask_reg_coef: float = 0.01
    """Weight of the regulariser ||m||_2 on the absorbing state."""
    loss_on: Literal["auto", "all", "target"] = "auto"
    """Positions scored by the mse and rounding losses: all (DiffuSeq parity), target only, or
    auto: all for sources up to 512 tokens (DiffuSeq's own range), target for longer ones (scoring
    a long source costs a (source, vocabulary) logits tensor per example and every step)."""
    timestep_sampler: Literal["uniform", "loss_aware", "high_noise"] = "uniform"
    """How training timesteps are drawn: uniform; loss_aware (the second-moment resampler,
    importance weighted); high_noise (p_t proportional to (t + 1)^timestep_power, unweighted:
    more training where noise is high, where the target must come from the source)."""
    timestep_power: float = 1.0
    """The high_noise sampler's exponent: 1 puts a share 1 - (3/4)^2 = 0.44 of the draws in the
    schedule's top quarter, 2 puts 0.58 there."""
    x0_nll_coef: float = 0.0
    """Weight of a cross-entropy of the rounding head on x0_hat at the target's positions (0: off,
    as DiffuSeq): it scores the token the denoiser writes, where the mse scores an embedding
    distance."""
    skip_connection: bool = False
    """Predict x0 as m + sqrt(ab_t) (z_t - m) + sqrt(1 - ab_t) F(z_t): the best linear guess plus a
    learned residual (EDM-style preconditioning). False: the network's output is x0 (DiffuSeq)."""
    self_conditioning: float = 0.0
    """Self-conditioning (Analog Bits): the share of training examples whose denoiser also reads its
    own first x0 estimate, as each sampling step reads the previous one's; 0 turns it off (and the
    network has no such input)."""
    unroll: float = 0.0
    """The share of training examples whose noisy target is made as a sampler makes it: one
    deterministic step down to t from a higher noise level, with the denoiser's own x0 estimate
    there (without gradient). It teaches the denoiser to correct its earlier answer rather than
    keep it; 0 turns it off (DiffuSeq)."""

    def denoise_rate_at(self, step: int | None) -> float:
        """gamma at optimizer step ``step`` (None: the full rate), 0 without the soft absorbing
        state. It ramps up over ``denoise_warmup_steps``: early in training the network cannot yet
        fill a replaced token from its context, and each replacement only takes signal away."""
        if not self.soft_absorbing:
            return 0.0
        if step is None or self.denoise_warmup_steps == 0:
            return self.denoise_rate
        return self.denoise_rate * min(1.0, step / self.denoise_warmup_steps)

    def __post_init__(self) -> None:
        _check_choices(self, "diffusion")
        _check(self.steps >= 2, "diffusion.steps", self.steps, "must be >= 2")
        _check(0.0 <= self.denoise_rate <= 1.0, "diffusion.denoise_rate", self.denoise_rate,
               "must be in [0, 1]")
        _check(self.denoise_warmup_steps >= 0, "diffusion.denoise_warmup_steps",
               self.denoise_warmup_steps, "must be >= 0")
        _check(self.mask_reg_coef >= 0, "diffusion.mask_reg_coef", self.mask_reg_coef,
               "must be >= 0")
        _check(0.0 <= self.self_conditioning <= 1.0, "diffusion.self_conditioning",
               self.self_conditioning, "must be in [0, 1]")
        _check(0.0 <= self.unroll <= 1.0, "diffusion.unroll", self.unroll, "must be in [0, 1]")
        _check(self.timestep_power > 0, "diffusion.timestep_power", self.timestep_power,
               "must be > 0")
        # Only high_noise reads the exponent; a changed one elsewhere would be silently ignored.
        _check(self.timestep_power == 1.0 or self.timestep_sampler == "high_noise",
               "diffusion.timestep_power", self.timestep_power,
               f"applies to timestep_sampler: high_noise only (it is {self.timestep_sampler})")
        _check(self.x0_nll_coef >= 0, "diffusion.x0_nll_coef", self.x0_nll_coef, "must be >= 0")


# How a sample becomes text (moe_diffuseq.batch.decode_targets).
DecodeMode = Literal["strip", "truncate"]
DECODE_MODES = get_args(DecodeMode)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings, stored in the checkpoint as the defaults of generation; unset options of
    ``generate`` and ``evaluate`` take the checkpoint's."""

    sampler: SamplerName = "dpm_solver++"
    """Sampler: ancestral (all T steps, the reference), ddim, dpm_solver++ (the probability-flow
    ODE) or sde_dpm_solver++ (the reverse SDE: fresh noise at every step, as ancestral)."""
    steps: int = 20
    """Sampling steps for ddim and the DPM-Solvers (ancestral always uses T)."""
    spacing: Literal["time_uniform", "logsnr"] = "logsnr"
    """How the sampling timesteps are spread over [0, T)."""
    clamp: bool = False
    """Snap each predicted x0 to its nearest word embedding at every step (DiffuSeq's clamping)."""
    variance: Literal["posterior", "fixed_large"] = "posterior"
    """Noise of each ancestral step: the true posterior's variance, or DiffuSeq's fixed_large
    (beta_t)."""
    num_candidates: int = 1
    """Seeds per source; more than 1 picks one by MBR with sentence-BLEU."""
    batch_size: int = 16
    """Sources sampled together."""
    decode: DecodeMode = "strip"
    """Sample to text: strip drops every [SEP] and [PAD] and keeps the other tokens (DiffuSeq's
    evaluation); truncate stops at the first [SEP] or [PAD]."""
    restarts: int = 0
    """Restart rounds after the first sample (0: none). Each rounds the sample to tokens, noises
    their embeddings again to ``restart_noise`` and samples down from there: the denoiser then
    starts from a sequence of tokens, as in training, and can fix a layout its first steps from
    pure noise got wrong."""
    restart_noise: float = 0.7
    """Where a restart begins, as a fraction of the T diffusion steps: high enough that the
    denoiser may move an item to another slot, low enough that the sample's tokens still show
    through the noise."""
    restart_steps: int = 10
    """Sampling steps of each restart (ddim and the DPM-Solvers; ancestral takes every step)."""

    def __post_init__(self) -> None:
        _check_choices(self, "sampling")
        _check(self.steps >= 1, "sampling.steps", self.steps, "must be >= 1")
        _check(self.restarts >= 0, "sampling.restarts", self.restarts, "must be >= 0")
        _check(0.0 < self.restart_noise < 1.0, "sampling.restart_noise", self.restart_noise,
               "must be in (0, 1)")
        _check(self.restart_steps >= 1, "sampling.restart_steps", self.restart_steps,
               "must be >= 1")
        _check(self.num_candidates >= 1, "sampling.num_candidates", self.num_candidates,
               "must be >= 1")
        _check(self.batch_size >= 1, "sampling.batch_size", self.batch_size, "must be >= 1")


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
