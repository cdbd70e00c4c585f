"""The one config tree of a decomposition: frozen pydantic models, YAML/JSON IO and `--set`
overrides.

Loss and eval metrics are a discriminated union on `classname`, task configs on `task_name`, toy
target models on `model_type`. Every field carries a one-line description that doubles as
documentation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spd_ray.errors import InputError
from spd_ray.io import write_text


class BaseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Schedules and modules
# ---------------------------------------------------------------------------------------------


class ScheduleConfig(BaseConfig):
    start_val: float = Field(description="Value after warmup (the peak learning rate).")
    warmup_pct: float = Field(
        0.0, ge=0.0, le=1.0, description="Fraction of steps of linear warmup."
    )
    final_val_frac: float = Field(
        1.0, ge=0.0, description="Final value as a fraction of start_val."
    )
    fn_type: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="Decay shape after warmup."
    )

    @model_validator(mode="after")
    def _constant_is_flat(self) -> ScheduleConfig:
        if self.fn_type == "constant" and self.final_val_frac != 1.0:
            raise InputError("lr_schedule.final_val_frac must be 1.0 when fn_type is 'constant'")
        return self


class ModulePatternInfo(BaseConfig):
    module_pattern: str = Field(description="fnmatch pattern over the target's named_modules().")
    C: int = Field(gt=0, description="Number of subcomponents for each matched module.")


# ---------------------------------------------------------------------------------------------
# The method's choices, named once (core/ takes its types from here)
# ---------------------------------------------------------------------------------------------

CIFnType = Literal["mlp", "vector_mlp", "shared_mlp"]
SigmoidType = Literal["normal", "hard", "leaky_hard", "upper_leaky_hard", "swish_hard"]
Sampling = Literal["continuous", "binomial"]
MaskRng = Literal["counter", "generator"]
OutputLossType = Literal["mse", "kl"]


# ---------------------------------------------------------------------------------------------
# Loss and metric configs (discriminated on `classname`)
# ---------------------------------------------------------------------------------------------


class UniformKSubsetRouting(BaseConfig):
    type: Literal["uniform_k_subset"] = "uniform_k_subset"


class StaticProbabilityRouting(BaseConfig):
    type: Literal["static_probability"] = "static_probability"
    p: float = Field(
        gt=0.0, le=1.0, description="Probability that a module is routed per position."
    )


SubsetRoutingConfig = Annotated[
    UniformKSubsetRouting | StaticProbabilityRouting, Field(discriminator="type")
]
# The `routing` field of every subset loss
Routing = Annotated[
    SubsetRoutingConfig,
    Field(
        default_factory=UniformKSubsetRouting, description="How modules are routed per position."
    ),
]


class _LossMetric(BaseConfig):
    coeff: float | None = Field(
        None, description="Weight in the total loss; required when used as a training loss."
    )


class FaithfulnessLoss(_LossMetric):
    classname: Literal["FaithfulnessLoss"] = "FaithfulnessLoss"


class ImportanceMinimalityLoss(_LossMetric):
    classname: Literal["ImportanceMinimalityLoss"] = "ImportanceMinimalityLoss"
    pnorm: float = Field(gt=0.0, description="Exponent p of sum_c (g_c + eps)^p.")
    beta: float = Field(0.0, ge=0.0, description="Weight of the m_c * log2(1 + S_c) term.")
    p_anneal_start_frac: float = Field(1.0, ge=0.0, le=1.0, description="Start of p annealing.")
    p_anneal_final_p: float | None = Field(
        None, gt=0.0, description="Final p (None: no annealing)."
    )
    p_anneal_end_frac: float = Field(1.0, ge=0.0, le=1.0, description="End of p annealing.")
    eps: float = Field(1e-12, ge=0.0, description="Added to CI values before the power.")


class UnmaskedReconLoss(_LossMetric):
    classname: Literal["UnmaskedReconLoss"] = "UnmaskedReconLoss"


class CIMaskedReconLoss(_LossMetric):
    classname: Literal["CIMaskedReconLoss"] = "CIMaskedReconLoss"


class CIMaskedReconLayerwiseLoss(_LossMetric):
    classname: Literal["CIMaskedReconLayerwiseLoss"] = "CIMaskedReconLayerwiseLoss"


class CIMaskedReconSubsetLoss(_LossMetric):
    classname: Literal["CIMaskedReconSubsetLoss"] = "CIMaskedReconSubsetLoss"
    routing: Routing


class StochasticReconLoss(_LossMetric):
    classname: Literal["StochasticReconLoss"] = "StochasticReconLoss"


class StochasticReconLayerwiseLoss(_LossMetric):
    classname: Literal["StochasticReconLayerwiseLoss"] = "StochasticReconLayerwiseLoss"


class StochasticReconSubsetLoss(_LossMetric):
    classname: Literal["StochasticReconSubsetLoss"] = "StochasticReconSubsetLoss"
    routing: Routing


class StochasticHiddenActsReconLoss(_LossMetric):
    classname: Literal["StochasticHiddenActsReconLoss"] = "StochasticHiddenActsReconLoss"


class _PGD(_LossMetric):
    init: Literal["random", "ones", "zeroes"] = Field(description="Initial adversarial sources.")
    step_size: float = Field(gt=0.0, description="Signed-gradient ascent step on the sources.")
    n_steps: int = Field(ge=0, description="Number of ascent steps.")
    mask_scope: Literal["unique_per_datapoint", "shared_across_batch"] = Field(
        "unique_per_datapoint", description="One source per position, or one for the whole batch."
    )


class PGDReconLoss(_PGD):
    classname: Literal["PGDReconLoss"] = "PGDReconLoss"


class PGDReconLayerwiseLoss(_PGD):
    classname: Literal["PGDReconLayerwiseLoss"] = "PGDReconLayerwiseLoss"


class PGDReconSubsetLoss(_PGD):
    classname: Literal["PGDReconSubsetLoss"] = "PGDReconSubsetLoss"
    routing: Routing


class _PGDMultiBatch(BaseConfig):
    """Eval only: PGD whose sources (one per module, shared by every position) are pushed up on
    the summed loss of `gradient_accumulation_steps` eval batches before each signed step."""

    init: Literal["random", "ones", "zeroes"] = Field(description="Initial adversarial sources.")
    step_size: float = Field(gt=0.0, description="Signed-gradient ascent step on the sources.")
    n_steps: int = Field(ge=0, description="Number of ascent steps.")
    gradient_accumulation_steps: int = Field(
        ge=1, description="Eval batches whose gradients are summed before each step."
    )


class PGDMultiBatchReconLoss(_PGDMultiBatch):
    classname: Literal["PGDMultiBatchReconLoss"] = "PGDMultiBatchReconLoss"


class PGDMultiBatchReconSubsetLoss(_PGDMultiBatch):
    classname: Literal["PGDMultiBatchReconSubsetLoss"] = "PGDMultiBatchReconSubsetLoss"
    routing: Routing


LossConfig = (
    FaithfulnessLoss
    | ImportanceMinimalityLoss
    | UnmaskedReconLoss
    | CIMaskedReconLoss
    | CIMaskedReconLayerwiseLoss
    | CIMaskedReconSubsetLoss
    | StochasticReconLoss
    | StochasticReconLayerwiseLoss
    | StochasticReconSubsetLoss
    | StochasticHiddenActsReconLoss
    | PGDReconLoss
    | PGDReconLayerwiseLoss
    | PGDReconSubsetLoss
)
LOSS_CLASSNAMES: tuple[str, ...] = tuple(
    c.model_fields["classname"].default
    for c in LossConfig.__args__  # type: ignore[attr-defined]
)


# Eval-only metrics --------------------------------------------------------------------------------


class CEandKLLosses(BaseConfig):
    classname: Literal["CEandKLLosses"] = "CEandKLLosses"
    rounding_threshold: float = Field(0.0, description="CI above this is rounded to 1, else 0.")


class CIHistograms(BaseConfig):
    classname: Literal["CIHistograms"] = "CIHistograms"
    n_batches_accum: int | None = Field(
        None, gt=0, description="Eval batches gathered (None: all)."
    )


class CI_L0(BaseConfig):
    classname: Literal["CI_L0"] = "CI_L0"
    groups: dict[str, list[str]] | None = Field(
        None, description="Named groups of module patterns whose L0 is summed."
    )


class CIMeanPerComponent(BaseConfig):
    classname: Literal["CIMeanPerComponent"] = "CIMeanPerComponent"


class ComponentActivationDensity(BaseConfig):
    classname: Literal["ComponentActivationDensity"] = "ComponentActivationDensity"


class IdentityCIPattern(BaseConfig):
    layer_pattern: str = Field(description="fnmatch pattern of the decomposed module.")
    n_features: int = Field(gt=0, description="Expected one subcomponent per input feature.")


class DenseCIPattern(BaseConfig):
    layer_pattern: str = Field(description="fnmatch pattern of the decomposed module.")
    k: int = Field(gt=0, description="Expected number of subcomponents active on every feature.")


class IdentityCIError(BaseConfig):
    classname: Literal["IdentityCIError"] = "IdentityCIError"
    identity_ci: list[IdentityCIPattern] | None = Field(
        None, description="Identity-pattern layers."
    )
    dense_ci: list[DenseCIPattern] | None = Field(None, description="Dense-pattern layers.")


class PermutedCIPlots(BaseConfig):
    classname: Literal["PermutedCIPlots"] = "PermutedCIPlots"
    identity_patterns: list[str] | None = Field(None, description="Layers permuted to identity.")
    dense_patterns: list[str] | None = Field(None, description="Layers sorted as dense.")


class UVPlots(BaseConfig):
    classname: Literal["UVPlots"] = "UVPlots"
    identity_patterns: list[str] | None = Field(None, description="Layers permuted to identity.")
    dense_patterns: list[str] | None = Field(None, description="Layers sorted as dense.")


class MMCSAndML2R(BaseConfig):
    """Paper Table 1: per input feature, the best-matching subcomponent's column vs the target's.
    Logs `mmcs/<layer>`, `ml2r/<layer>` (the reference: every subcomponent competes) and
    `mmcs_filtered/<layer>`, `ml2r_filtered/<layer>` (only those passing min_norm_frac)."""

    classname: Literal["MMCSAndML2R"] = "MMCSAndML2R"
    module_patterns: list[str] = Field(
        description="Linear layers whose input features are matched."
    )
    min_norm_frac: float = Field(
        0.1,
        ge=0.0,
        description="For *_filtered: a column under this fraction of the target column's norm "
        "never matches.",
    )


class StochasticReconSubsetCEAndKL(BaseConfig):
    classname: Literal["StochasticReconSubsetCEAndKL"] = "StochasticReconSubsetCEAndKL"
    include_patterns: dict[str, list[str]] | None = Field(None, description="Subset: these only.")
    exclude_patterns: dict[str, list[str]] | None = Field(
        None, description="Subset: all but these."
    )


EvalOnlyConfig = (
    CEandKLLosses
    | CIHistograms
    | CI_L0
    | CIMeanPerComponent
    | ComponentActivationDensity
    | IdentityCIError
    | PermutedCIPlots
    | UVPlots
    | MMCSAndML2R
    | StochasticReconSubsetCEAndKL
    | PGDMultiBatchReconLoss
    | PGDMultiBatchReconSubsetLoss
)

LossMetricConfig = Annotated[LossConfig, Field(discriminator="classname")]
EvalMetricConfig = Annotated[LossConfig | EvalOnlyConfig, Field(discriminator="classname")]


# ---------------------------------------------------------------------------------------------
# Tasks (data)
# ---------------------------------------------------------------------------------------------


# at_least_zero_active: each feature active independently with feature_probability;
# exactly_<n>_active: n distinct features per row
DataGenerationType = Literal[
    "at_least_zero_active",
    "exactly_one_active",
    "exactly_two_active",
    "exactly_three_active",
    "exactly_four_active",
    "exactly_five_active",
]


class _ToyTaskConfig(BaseConfig):
    feature_probability: float = Field(gt=0.0, le=1.0, description="P(feature active).")
    data_generation_type: DataGenerationType = Field(
        "at_least_zero_active", description="How sparse inputs are drawn."
    )
    synced_inputs: list[list[int]] | None = Field(
        None,
        description="Feature groups that fire together: when one feature of a group is active, "
        "every feature of the group is (each with its own value).",
    )

    @model_validator(mode="after")
    def _check_groups(self) -> _ToyTaskConfig:
        seen: set[int] = set()
        for group in self.synced_inputs or []:
            if len(group) < 2 or len(set(group)) != len(group) or min(group) < 0:
                raise InputError(f"synced_inputs group {group}: two or more distinct features >= 0")
            if seen & set(group):
                raise InputError(
                    f"synced_inputs: feature(s) {sorted(seen & set(group))} in two groups"
                )
            seen |= set(group)
        return self


class TMSTaskConfig(_ToyTaskConfig):
    task_name: Literal["tms"] = "tms"


class ResidMLPTaskConfig(_ToyTaskConfig):
    task_name: Literal["resid_mlp"] = "resid_mlp"


class IHTaskConfig(BaseConfig):
    task_name: Literal["ih"] = "ih"
    prefix_window: int | None = Field(None, gt=1, description="S is placed in [1, prefix_window).")
    output_positions: Literal["all", "last"] = Field(
        "all",
        description="Logits the output loss and evals compare: every position (the reference) "
        "or the last one only (where the induction label is).",
    )


class LMTaskConfig(BaseConfig):
    task_name: Literal["lm"] = "lm"
    max_seq_len: int = Field(512, gt=0, description="Tokens per sequence.")
    buffer_size: int = Field(1000, gt=0, description="Shuffle buffer when streaming.")
    dataset_name: str = Field(
        "lennart-finke/SimpleStories",
        description="Hub id, local folder/file, or '@tiny-lm/<part>' (offline assets under "
        "<output root>/assets/tiny-lm, built when missing).",
    )
    column_name: str = Field("story", description="Text (or token) column.")
    train_data_split: str = Field("train", description="Training split.")
    eval_data_split: str = Field("test", description="Eval split.")
    shuffle_each_epoch: bool = Field(True, description="Reshuffle every epoch.")
    is_tokenized: bool = Field(False, description="The column already holds token ids.")
    streaming: bool = Field(False, description="Stream the dataset instead of downloading it.")


TaskConfig = Annotated[
    TMSTaskConfig | ResidMLPTaskConfig | IHTaskConfig | LMTaskConfig,
    Field(discriminator="task_name"),
]


# ---------------------------------------------------------------------------------------------
# Toy targets: model + how to train it (the trainer caches the result keyed by this config's hash)
# ---------------------------------------------------------------------------------------------


class TMSTargetConfig(BaseConfig):
    model_type: Literal["tms"] = "tms"
    n_features: int = Field(gt=0, description="Input/output features.")
    n_hidden: int = Field(gt=0, description="Bottleneck width.")
    n_hidden_layers: int = Field(0, ge=0, description="Hidden n_hidden x n_hidden layers.")
    tied_weights: bool = Field(False, description="linear2.weight = linear1.weight^T.")
    fix_hidden_identity: bool = Field(False, description="Hidden layers frozen at the identity.")
    fixed_random_hidden_layers: bool = Field(
        False, description="Hidden layers frozen at their random init (the reference's option)."
    )
    init_bias_to_zero: bool = Field(False, description="Start linear2's bias at zero.")
    seed: int = Field(0, description="Seed of the target's training.")
    steps: int = Field(10_000, gt=0, description="Training steps.")
    batch_size: int = Field(1024, gt=0, description="Training batch size.")
    lr: float = Field(5e-3, gt=0.0, description="Constant AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    feature_probability: float = Field(0.05, gt=0.0, le=1.0, description="P(feature active).")

    @model_validator(mode="after")
    def _check_hidden(self) -> TMSTargetConfig:
        if self.fix_hidden_identity and self.fixed_random_hidden_layers:
            raise InputError(
                "fix_hidden_identity and fixed_random_hidden_layers exclude each other: the hidden "
                "layers are frozen at the identity or at their random init"
            )
        return self


class ResidMLPTargetConfig(BaseConfig):
    model_type: Literal["resid_mlp"] = "resid_mlp"
    n_features: int = Field(gt=0, description="Input features.")
    d_embed: int = Field(gt=0, description="Residual stream width.")
    d_mlp: int = Field(gt=0, description="Neurons per MLP.")
    n_layers: int = Field(gt=0, description="Residual MLP blocks.")
    act_fn_name: Literal["relu", "gelu"] = Field("relu", description="MLP nonlinearity.")
    label_type: Literal["act_plus_resid", "abs"] = Field(
        "act_plus_resid", description="Labels act(c*x)+x or |c*x|."
    )
    use_trivial_label_coeffs: bool = Field(True, description="c = 1 (else U[1,2] per feature).")
    label_fn_seed: int | None = Field(
        None, description="Seed of the label coefficients c (None: `seed`, as the embedding)."
    )
    in_bias: bool = Field(False, description="A bias on every mlp_in.")
    out_bias: bool = Field(False, description="A bias on every mlp_out.")
    embedding: Literal["fixed_random", "identity", "trainable"] = Field(
        "fixed_random",
        description="W_E: fixed random unit rows, the identity (d_embed = n_features), or trained "
        "with the MLPs (random init).",
    )
    loss_type: Literal["readoff", "resid"] = Field(
        "readoff",
        description="Target training loss on the read-off output (residual @ W_E^T) against the "
        "labels, or on the final residual stream against the labels embedded (labels @ W_E).",
    )
    feature_importance_decay: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="The target's loss weighs feature i by decay**i (1: all equal; readoff only).",
    )
    seed: int = Field(0, description="Seed of embedding, labels and training.")
    steps: int = Field(1000, gt=0, description="Training steps.")
    batch_size: int = Field(2048, gt=0, description="Training batch size.")
    lr: float = Field(3e-3, gt=0.0, description="Peak AdamW learning rate (cosine to 0).")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    feature_probability: float = Field(0.01, gt=0.0, le=1.0, description="P(feature active).")

    @model_validator(mode="after")
    def _check_embedding(self) -> ResidMLPTargetConfig:
        if self.embedding == "identity" and self.d_embed != self.n_features:
            raise InputError(
                f"embedding 'identity' needs d_embed == n_features, got d_embed {self.d_embed} "
                f"and n_features {self.n_features}"
            )
        if self.loss_type == "resid" and self.feature_importance_decay != 1.0:
            raise InputError(
                "feature_importance_decay weighs read-off features: it needs loss_type 'readoff'"
            )
        return self


class IHTargetConfig(BaseConfig):
    model_type: Literal["ih"] = "ih"
    vocab_size: int = Field(128, gt=0, description="Ordinary tokens (plus BOS and induction).")
    seq_len: int = Field(64, gt=2, description="Sequence length.")
    d_model: int = Field(16, gt=0, description="Residual width.")
    n_heads: int = Field(1, gt=0, description="Attention heads.")
    n_layers: int = Field(2, gt=0, description="Attention blocks.")
    seed: int = Field(0, description="Training seed.")
    steps: int = Field(100_000, gt=0, description="Training steps.")
    batch_size: int = Field(1024, gt=0, description="Training batch size.")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate.")
    lr_warmup_steps: int = Field(1000, ge=0, description="Linear warmup steps.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="After warmup: constant, or cosine / linear decay to 0 at `steps`."
    )
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    use_mlp: bool = Field(
        False, description="An MLP (d_model -> d_mlp -> d_model, GELU) in every block."
    )
    d_mlp: int = Field(64, gt=0, description="MLP width (with use_mlp).")
    use_layer_norm: bool = Field(
        False, description="Pre-LayerNorm before attention (and MLP) and before the unembedding."
    )
    use_positional_encoding: bool = Field(
        True, description="Add the sinusoidal encoding to queries and keys (off: no position info)."
    )


ToyTargetConfig = TMSTargetConfig | ResidMLPTargetConfig | IHTargetConfig
TargetModelConfig = Annotated[ToyTargetConfig, Field(discriminator="model_type")]

# The model classes of the toy targets (a toy config needs no `pretrained_model_class`)
TOY_CLASSES = {
    "tms": "spd_ray.targets.tms.TMSModel",
    "resid_mlp": "spd_ray.targets.resid_mlp.ResidMLP",
    "ih": "spd_ray.targets.ih.InductionTransformer",
}


@dataclass(frozen=True)
class ToyTarget:
    """A toy model trained from its config, cached under the output root by config hash."""

    model: ToyTargetConfig
    model_class: str


@dataclass(frozen=True)
class FileTarget:
    """A target saved with `spd_ray.targets.save_target` (a toy model's file)."""

    path: str
    model_class: str | None  # checked against the loaded model when given


@dataclass(frozen=True)
class HubTarget:
    """A Hugging Face model: `model_class.from_pretrained(name)`, read through `output_attr`."""

    name: str
    model_class: str
    output_attr: str


# Where a config's target comes from: exactly one kind, resolved from the flat fields
TargetSource = ToyTarget | FileTarget | HubTarget


# ---------------------------------------------------------------------------------------------
# The top-level config
# ---------------------------------------------------------------------------------------------


class Config(BaseConfig):
    # Run identity / tracking
    wandb_project: str | None = Field(None, description="W&B project (None: no W&B).")
    wandb_run_name: str | None = Field(None, description="W&B run name.")
    wandb_run_name_prefix: str = Field("", description="Prefix of generated W&B run names.")
    seed: int = Field(0, description="Seed of component init, masks and data.")

    # Components and CI functions
    autocast_bf16: bool = Field(
        True, description="Run forwards under bf16 autocast (CPU and CUDA); losses reduce in fp32."
    )
    eval_autocast_bf16: bool = Field(
        False,
        description="Evals also under bf16 autocast when autocast_bf16 (default: fp32 evals, as "
        "the reference).",
    )
    n_mask_samples: int = Field(gt=0, description="Stochastic mask samples per step (S).")
    ci_fn_type: CIFnType = Field("vector_mlp", description="Causal-importance function family.")
    ci_fn_hidden_dims: list[int] = Field([8], description="Hidden widths of the CI functions.")
    sampling: Sampling = Field("continuous", description="Mask noise: U[0,1) or fair coin.")
    sigmoid_type: SigmoidType = Field(
        "leaky_hard", description="Sigmoid applied to CI pre-activations."
    )
    module_info: list[ModulePatternInfo] = Field(description="Modules to decompose and their C.")
    identity_module_info: list[ModulePatternInfo] | None = Field(
        None, description="Modules that get an identity inserted before them, decomposed too."
    )
    use_delta_component: bool = Field(True, description="Add W - VU^T as an extra maskable term.")
    reuse_clean_activations: bool = Field(
        True,
        description="Masked forwards reuse the clean run's activations until a copy diverges, "
        "and start from its prefix where the target splits its forward (forward_prefix) "
        "(exact for models that run each decomposed module once per forward).",
    )
    low_rank_forward: bool = Field(
        True,
        description="Clean and masked forwards of a target that keeps its wide activations as "
        "sums of narrow products (ResidMLP's residual stream: x @ W_E plus each block's output) "
        "run on those terms, contracting the small weight products first (spd_ray.core.lowrank): "
        "the same function with a fraction of the FLOPs. Needs reuse_clean_activations.",
    )
    compile_ci_fns: bool = Field(
        False, description="torch.compile the CI functions (faster steps, slower start)."
    )
    compile: bool | None = Field(
        None,
        description="torch.compile the whole training step (forwards, CI functions, losses, "
        "backward) as one graph, the masks drawn eagerly from the run's streams and passed in "
        "(same numbers as the eager step; PGD's inner gradient is traced too). None: on for "
        "1-worker runs of at least 1000 steps (core.step.COMPILE_MIN_STEPS), where the ~10-60 s "
        "compile pays off; false: eager.",
    )
    mask_rng: MaskRng = Field(
        "counter",
        description="Where mask noise and PGD's random sources come from: 'counter' hashes "
        "(stream seed, draw number, element index) (spd_ray.core.counter_rng), so a compiled "
        "step computes its draws inside the graph and CPU and GPU draw the same numbers; "
        "'generator' draws from torch.Generators (a serial Mersenne Twister on CPU), the "
        "stream of runs made before counter-based noise existed.",
    )
    ci_skip_zero_rows: bool | None = Field(
        None,
        description="Evaluate the CI functions once for all rows whose module input is exactly "
        "zero (they share one value: a CI function is row-wise and x @ V of a zero row is 0) and "
        "on the other rows alone, compacted to a size measured on the first batch; the same "
        "numbers up to float rounding (most rows of the sparse toy tasks are zero). None: on for "
        "CPU workers; off on GPUs, where the check of the compacted size would sync the host.",
    )
    compact_zero_rows: bool | None = Field(
        None,
        description="Run training steps and evals on the batch's nonzero rows, compacted to a "
        "size measured on the first batch, for targets whose rows are independent (the toy "
        "models): a zero row that reaches every decomposed module as zeros (checked every "
        "step) reconstructs exactly under any masks, so it adds nothing to a reconstruction "
        "loss or gradient, and importance minimality, L0 and the eval's CI statistics count "
        "the zero rows from one of them (spd_ray.core.rows); the same numbers up to float "
        "rounding. None: on for CPU workers; off on GPUs, where the check of the compacted "
        "size would sync the host.",
    )
    masked_copies_per_forward: int | None = Field(
        None,
        ge=1,
        description="At most this many masked copies of the batch per forward, each chunk "
        "recomputed in backward, so layerwise losses' memory stops growing with the module count "
        "(None: all copies in one forward).",
    )
    masked_forward_budget_mb: float | None = Field(
        None,
        gt=0,
        description="Chunk the masked copies so what one forward keeps for backward stays near "
        "this many MB: copies per forward = this // the bytes one copy keeps, measured once per "
        "model and batch shape (with masked_copies_per_forward too, the smaller chunk wins; "
        "None: no budget).",
    )

    # Losses
    loss_metric_configs: list[LossMetricConfig] = Field(description="Training losses (coeff each).")
    output_loss_type: OutputLossType = Field(description="Output reconstruction distance.")

    # Optimisation
    lr_schedule: ScheduleConfig = Field(description="Learning-rate schedule.")
    steps: int = Field(gt=0, description="Optimizer steps.")
    batch_size: int = Field(gt=0, description="Global batch size (split across workers).")
    grad_clip_norm_components: float | None = Field(None, gt=0.0, description="Clip V/U grads.")
    grad_clip_norm_ci_fns: float | None = Field(None, gt=0.0, description="Clip CI-fn grads.")
    faithfulness_warmup_steps: int = Field(0, ge=0, description="Steps fitting VU to W first.")
    faithfulness_warmup_lr: float = Field(1e-3, gt=0.0, description="LR of that warmup.")
    faithfulness_warmup_weight_decay: float = Field(0.0, ge=0.0, description="Its weight decay.")

    # Logging and evaluation
    train_log_freq: int = Field(50, gt=0, description="Log train metrics every N steps.")
    eval_freq: int = Field(gt=0, description="Evaluate every N steps.")
    eval_batch_size: int | None = Field(None, gt=0, description="Eval batch (None: batch_size).")
    slow_eval_freq: int | None = Field(None, gt=0, description="Figures every N steps.")
    n_eval_steps: int = Field(gt=0, description="Eval batches per evaluation.")
    slow_eval_on_first_step: bool = Field(True, description="Make figures at step 0 too.")
    save_freq: int | None = Field(None, gt=0, description="Checkpoint every N steps.")
    eval_metric_configs: list[EvalMetricConfig] = Field([], description="Eval-only metrics.")
    ci_alive_threshold: float = Field(0.0, ge=0.0, description="CI above this counts as active.")

    # Target
    pretrained_model_class: str | None = Field(
        None,
        description="Dotted import path of the target class (required for a Hugging Face "
        "target; a toy target's own class by default).",
    )
    pretrained_model_path: str | None = Field(None, description="Saved target file (toy models).")
    pretrained_model_name: str | None = Field(
        None,
        description="Hub id, local folder, or '@tiny-lm/<part>' (offline assets under "
        "<output root>/assets/tiny-lm, built when missing), loaded with from_pretrained.",
    )
    pretrained_model_output_attr: str | None = Field(
        None,
        description="Output attribute ('logits') or tuple index ('idx_0'); required for "
        "Hugging Face targets.",
    )
    tokenizer_name: str | None = Field(
        None, description="Tokenizer hub id, local folder, or '@tiny-lm/<part>' (as above)."
    )
    target_model: TargetModelConfig | None = Field(
        None, description="Toy target to train (cached by config hash) when no path is given."
    )
    task_config: TaskConfig = Field(description="Data generation.")

    @model_validator(mode="after")
    def _check(self) -> Config:
        for i, loss in enumerate(self.loss_metric_configs):
            if loss.coeff is None:
                raise InputError(
                    f"loss_metric_configs.{loss.classname}.coeff is required "
                    f"(item {i} of loss_metric_configs has no coeff)"
                )
        if self.slow_eval_freq is not None and self.slow_eval_freq % self.eval_freq != 0:
            raise InputError("slow_eval_freq must be a multiple of eval_freq")
        names = [m.module_pattern for m in self.module_info]
        if len(set(names)) != len(names):
            raise InputError(f"module_info: duplicate module_pattern in {names}")
        sources = (self.pretrained_model_path, self.pretrained_model_name, self.target_model)
        if all(s is None for s in sources):
            raise InputError(
                "one of pretrained_model_path, pretrained_model_name or target_model is required"
            )
        if isinstance(self.target, HubTarget) and self.pretrained_model_output_attr is None:
            raise InputError(
                "pretrained_model_output_attr is required for a Hugging Face target (e.g. 'logits')"
            )
        classes = [m.classname for m in self.loss_metric_configs]
        if len(set(classes)) != len(classes):
            raise InputError(f"loss_metric_configs: a classname appears twice in {classes}")
        return self

    @property
    def target(self) -> TargetSource:
        """The target's source. When several are given, a saved file wins over a toy config,
        and a toy config over a hub name."""
        if self.pretrained_model_path is not None:
            return FileTarget(self.pretrained_model_path, self.pretrained_model_class)
        if self.target_model is not None:
            model_class = self.pretrained_model_class or TOY_CLASSES[self.target_model.model_type]
            return ToyTarget(self.target_model, model_class)
        if self.pretrained_model_name is None or self.pretrained_model_class is None:
            raise InputError(
                "pretrained_model_class is required with pretrained_model_name (the class whose "
                "from_pretrained loads it, e.g. transformers.AutoModelForCausalLM)"
            )
        return HubTarget(
            self.pretrained_model_name,
            self.pretrained_model_class,
            self.pretrained_model_output_attr or "",
        )

    @property
    def all_module_info(self) -> list[ModulePatternInfo]:
        extra = [
            ModulePatternInfo(module_pattern=f"{m.module_pattern}.pre_identity", C=m.C)
            for m in self.identity_module_info or []
        ]
        return [*self.module_info, *extra]

    @property
    def effective_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    @property
    def effective_slow_eval_freq(self) -> int:
        return self.slow_eval_freq or self.eval_freq


# ---------------------------------------------------------------------------------------------
# IO and overrides
# ---------------------------------------------------------------------------------------------


class ConfigError(InputError):
    """A config that cannot be loaded; the message names the file and key."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    where = f"{source}: " if source else ""
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}{loc}: {msg}{more}" if loc else f"{where}{msg}{more}"


def config_from_dict(data: dict[str, Any], source: str = "") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def read_config_dict(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    data = read_config_dict(path)
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, str(path))


def save_config(config: Config, path: Path) -> None:
    data = config.model_dump(mode="json", exclude_none=False)
    text = (
        json.dumps(data, indent=2)
        if path.suffix == ".json"
        else yaml.safe_dump(data, sort_keys=False)
    )
    write_text(path, text)


def config_hash(model: BaseModel) -> str:
    """A short hash of the config's non-default values (the toy-target cache key): a field added
    later with a default leaves every existing key, and so every cached target, as it was."""
    blob = json.dumps(model.model_dump(mode="json", exclude_defaults=True), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


_LIST_BY_CLASSNAME = ("loss_metric_configs", "eval_metric_configs")


def set_by_key(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Return a copy of `data` with the dotted `key` set to `value`.

    `loss_metric_configs.<ClassName>.<field>` updates the item of that classname (or appends a new
    one); other dotted keys walk nested mappings, creating them where missing.
    """
    data = json.loads(json.dumps(data))  # deep copy of plain data
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {key}: empty key component")
    node: Any = data
    i = 0
    while i < len(parts) - 1:
        part = parts[i]
        if part in _LIST_BY_CLASSNAME and isinstance(node, dict):
            items = node.setdefault(part, [])
            if i + 1 >= len(parts):
                raise ConfigError(f"--set {key}: expected {part}.<ClassName>[.<field>]")
            cls = parts[i + 1]
            match = [it for it in items if isinstance(it, dict) and it.get("classname") == cls]
            if not match:
                items.append({"classname": cls})
                match = [items[-1]]
            if i + 2 == len(parts):  # replace the whole item
                if not isinstance(value, dict):
                    raise ConfigError(f"--set {key}: expected a mapping for a whole item")
                match[0].clear()
                match[0].update({"classname": cls, **value})
                return data
            node = match[0]
            i += 2
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:i])}' is not a mapping")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        i += 1
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: '{'.'.join(parts[:-1])}' is not a mapping")
    node[parts[-1]] = value
    return data


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from None
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        key, value = parse_override(text)
        data = set_by_key(data, key, value)
    return data
