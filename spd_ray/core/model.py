"""ComponentModel: a target model whose chosen modules are swapped for decomposable wrappers.

Each decomposed module is replaced in its parent by a `DecomposedModule` that holds the frozen
original and its subcomponents. A forward runs in one of three modes, set for one call at a time:

- plain: the original modules only (the target itself);
- clean: the original modules, recording each wrapper's input and output (`CleanCache`);
- masked: K stacked copies of the batch, copy k using its own `{path: ModuleMask}`; modules without
  a mask in a copy run the target weights.

Masked forwards reuse the clean run. Until a copy has passed through a replaced module its
activations equal the clean ones, so a wrapper reads the cached input/output instead of recomputing
them, and the component path of a replaced module on a still-clean copy costs one small [*, C] x [C,
d_out] matmul. The delta component W - (VU)^T is never materialised per forward: with the component
acts a = x V and the target output y = x W^T + b, (a * m) U + m_d (x (W - (VU)^T)^T) + b  ==  (a *
(m - m_d)) U + m_d y + (1 - m_d) b. All-ones masks therefore return the target output exactly.

A target that keeps its wide activations as sums of narrow products (`spd_ray.core.lowrank`;
ResidMLP's residual stream) runs its clean and masked forwards on those terms: a wrapper then reads
a LowRank input through its weights (x @ (W_E V) rather than (x @ W_E) @ V) and, asked through
`low_rank_forward`, writes its output as terms ((a * m) with U, x with W^T, the bias), and the cache
forms a wide activation densely only where something reads it.

The reuse assumes each wrapper runs once per forward and a module's input depends only on the model
input and the modules run before it (true for feed-forward nets and transformers in eval mode); a
second call of a wrapper within one forward raises.
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from spd_ray.config import CIFnType, SigmoidType
from spd_ray.core.ci import (
    CIFn,
    ci_on_nonzero_rows,
    make_ci_fn,
    measured_capacity,
    nonzero_rows,
    sigmoid_pair,
)
from spd_ray.core.components import (
    Components,
    EmbeddingComponents,
    LinearComponents,
    TiedLinearComponents,
)
from spd_ray.core.lowrank import LowRank, Term, bias_term, linear_dense, linear_terms
from spd_ray.core.masks import Noise
from spd_ray.core.rows import KeptRows, kept_rows
from spd_ray.errors import InputError

ModuleKind = Literal["linear", "conv1d", "embedding", "identity"]


class Identity(nn.Module):
    """An inserted identity layer of width d, decomposable like a bias-free Linear(d, d)."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        return x


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x @ weight + bias with weight [d_in, d_out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def module_kind(module: nn.Module, path: str) -> ModuleKind:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, Identity):
        return "identity"
    if _is_conv1d(module):
        return "conv1d"
    raise InputError(
        f"module '{path}' has type {type(module).__name__}; only nn.Linear, nn.Embedding, "
        "GPT-2 Conv1D and inserted identities can be decomposed"
    )


def _dims(module: nn.Module, kind: ModuleKind) -> tuple[int, int]:
    match kind:
        case "linear":
            return module.in_features, module.out_features  # type: ignore[return-value]
        case "embedding":
            return module.num_embeddings, module.embedding_dim  # type: ignore[return-value]
        case "identity":
            return module.d, module.d  # type: ignore[return-value]
        case "conv1d":
            d_in, d_out = _weight(module).shape
            return int(d_in), int(d_out)


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor), f"{type(module).__name__}.weight is not a tensor"
    return weight


# The forward pre-hook that routes a module's input through its inserted identity, by module, so
# that wrapping the module can move the identity (and its hook) to the wrapper.
_IDENTITY_HOOKS: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()


def _pre_identity_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (module.get_submodule("pre_identity")(args[0]), *args[1:])


def insert_identity_operations(target: nn.Module, patterns: list[str]) -> list[str]:
    """Give each module matching a pattern a `pre_identity` layer its input passes through first.

    Idempotent: a module that already has one is left alone. Returns the identity paths.
    """
    paths = []
    for pattern in patterns:
        matched = [n for n, m in target.named_modules() if n and fnmatch.fnmatch(n, pattern)]
        matched = [n for n in matched if not n.endswith(".pre_identity")]
        if not matched:
            raise InputError(f"identity_module_info pattern '{pattern}' matches no module")
        for name in matched:
            module = target.get_submodule(name)
            kind = module_kind(module, name)
            if kind not in ("linear", "conv1d"):
                raise InputError(f"identity insertion needs a Linear or Conv1D, '{name}' is {kind}")
            if not hasattr(module, "pre_identity"):
                module.pre_identity = Identity(_dims(module, kind)[0])
                _IDENTITY_HOOKS[module] = module.register_forward_pre_hook(_pre_identity_hook)
            paths.append(f"{name}.pre_identity")
    return paths


def expand_module_patterns(target: nn.Module, module_info: list[tuple[str, int]]) -> dict[str, int]:
    """{path: C} for every module matched by a pattern, in module-registration order."""
    names = [n for n, _ in target.named_modules() if n]
    owner: dict[str, str] = {}
    found: dict[str, int] = {}
    for pattern, C in module_info:
        matched = [n for n in names if fnmatch.fnmatch(n, pattern)]
        if not matched:
            raise InputError(f"module_info pattern '{pattern}' matches no module of the target")
        for name in matched:
            if name in owner:
                raise InputError(
                    f"module '{name}' is matched by two patterns: '{owner[name]}' and '{pattern}'"
                )
            owner[name] = pattern
            found[name] = C
    return {n: found[n] for n in names if n in found}


@dataclass
class ModuleMask:
    """How one module is replaced in one copy of the batch."""

    mask: Float[Tensor, "*batch C"]
    delta: Float[Tensor, "*batch"] | None = None  # None: no weight-delta term
    route: Tensor | None = None  # Bool[*batch]; None: every position routed


class Activations:
    """Each wrapper's tensor from one clean forward, by path in forward order: dense, or kept as
    LowRank terms (a target's wide activations: `spd_ray.core.lowrank`) and formed densely the
    first time it is read."""

    def __init__(self) -> None:
        self._dense: dict[str, Tensor] = {}
        self._low: dict[str, LowRank] = {}
        self._order: list[str] = []

    def __setitem__(self, path: str, value: Tensor | LowRank) -> None:
        # A module run twice keeps its last tensor (a masked forward that reuses it refuses).
        if path not in self._order:
            self._order.append(path)
        self._dense.pop(path, None)
        self._low.pop(path, None)
        if isinstance(value, LowRank):
            self._low[path] = value
        else:
            self._dense[path] = value

    def __getitem__(self, path: str) -> Tensor:
        if path not in self._dense:
            self._dense[path] = self._low[path].dense()
        return self._dense[path]

    def __contains__(self, path: object) -> bool:
        return path in self._order

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def low_rank(self, path: str) -> LowRank | None:
        return self._low.get(path)

    def shape(self, path: str) -> torch.Size:
        return self._low[path].shape if path in self._low else self._dense[path].shape

    def row(self, path: str, i: int) -> Tensor:
        low = self._low.get(path)
        return self[path][i] if low is None else low.row_slice(i, i + 1).dense()[0]


class CleanCache:
    """Inputs and outputs of every wrapper in one clean forward, plus component acts x @ V
    (lazy)."""

    # (Not a dataclass: dynamo cannot call Activations as a default_factory in a compiled step.)
    def __init__(
        self,
        inputs: Activations | None = None,
        outputs: Activations | None = None,
        prefix: Tensor | LowRank | None = None,
    ):
        self.inputs = Activations() if inputs is None else inputs
        self.outputs = Activations() if outputs is None else outputs
        # The target's `forward_prefix` output, where it splits its forward (`ComponentModel`);
        # its `low_rank_prefix` where the model runs on terms.
        self.prefix = prefix
        self._acts: dict[str, Tensor] = {}
        self._components: dict[str, Components] = {}

    def acts(self, path: str) -> Tensor:
        if path not in self._acts:
            low = self.inputs.low_rank(path)
            comps = self._components[path]
            if low is not None:  # x @ V read through the terms
                self._acts[path] = low.matmul(comps.get_V())
            else:
                self._acts[path] = comps.acts(self.inputs[path])
        return self._acts[path]


@dataclass
class _Plan:
    mode: Literal["clean", "masked"]
    copies: list[dict[str, ModuleMask]] = field(default_factory=list)
    cache: CleanCache | None = None
    record: dict[str, Tensor] | None = None
    dirty: list[bool] = field(default_factory=list)
    called: set[str] = field(default_factory=set)


class _PlanHolder:
    plan: _Plan | None = None


class DecomposedModule(nn.Module):
    """Stands in for a decomposed module: runs the original or its masked components."""

    _bias: Tensor | None

    def __init__(
        self,
        original: nn.Module,
        components: Components,
        path: str,
        kind: ModuleKind,
        holder: _PlanHolder,
    ):
        super().__init__()
        if hasattr(original, "pre_identity"):
            # The inserted identity moves to the wrapper so that the component path sees its output
            # too (and the identity stays decomposable at `<path>.pre_identity`).
            self.pre_identity = original.pre_identity
            _IDENTITY_HOOKS.pop(original).remove()
            del original.pre_identity
            self.register_forward_pre_hook(_pre_identity_hook)
        self.original = original
        self.path, self.kind = path, kind
        self._components = [components]  # owned by the ComponentModel, not registered here
        self._holder = holder
        bias = getattr(original, "bias", None) if kind in ("linear", "conv1d") else None
        self.register_buffer("_bias", None if bias is None else bias.detach(), persistent=False)

    @property
    def components(self) -> Components:
        return self._components[0]

    def target_weight(self) -> Float[Tensor, "d_out d_in"]:
        match self.kind:
            case "linear" | "embedding":
                return _weight(self.original)
            case "conv1d":
                return _weight(self.original).T
            case "identity":
                assert isinstance(self.original, Identity)
                return torch.eye(self.original.d, device=self.components.get_V().device)

    def forward(self, x: Tensor | LowRank, *args: Any, **kwargs: Any) -> Tensor:
        """The module's output, dense; the input may be a LowRank (a target that keeps its wide
        activations as terms: `spd_ray.core.lowrank`), read through the weights."""
        plan = self._holder.plan
        if plan is None and not isinstance(x, LowRank):
            return self.original(x, *args, **kwargs)  # type: ignore[no-any-return]
        assert not args and not kwargs, f"{self.path}: decomposed modules take one tensor input"
        if plan is None or plan.mode == "clean":
            y = self._original(x)
            self._record_clean(plan, x, y)
            return y
        out = self._masked_forward(x, plan, low_rank=False)
        assert isinstance(out, Tensor)
        return out

    def low_rank_forward(self, x: Float[Tensor, "rows d_in"]) -> LowRank:
        """The module's output as a LowRank (`spd_ray.core.lowrank`): a wide output whose target
        reads it through linear maps only, as terms keyed by this module's path."""
        assert self.kind == "linear", f"{self.path}: low-rank outputs need a linear module"
        plan = self._holder.plan
        if plan is None or plan.mode == "clean":
            low = LowRank(self._original_terms(x))
            self._record_clean(plan, x, low)
            return low
        out = self._masked_forward(x, plan, low_rank=True)
        assert isinstance(out, LowRank)
        return out

    def _record_clean(self, plan: _Plan | None, x: Tensor | LowRank, out: Tensor | LowRank) -> None:
        """In a clean forward, the cache keeps the module's input and output."""
        if plan is None:
            return
        assert plan.cache is not None
        plan.cache.inputs[self.path] = x
        plan.cache.outputs[self.path] = out
        plan.cache._components[self.path] = self.components

    def _original_terms(
        self, x: Float[Tensor, "rows d_in"], scale: Tensor | None = None
    ) -> list[Term]:
        return linear_terms(self.path + ".W", x, _weight(self.original), self._bias, scale)

    def _original(self, x: Tensor | LowRank) -> Tensor:
        if isinstance(x, LowRank):
            return linear_dense(self.original, x)
        return self.original(x)  # type: ignore[no-any-return]

    def _acts(self, x: Tensor | LowRank) -> Tensor:
        if isinstance(x, LowRank):
            return x.matmul(self.components.get_V())
        return self.components.acts(x)

    def _masked_forward(self, x: Tensor | LowRank, plan: _Plan, low_rank: bool) -> Tensor | LowRank:
        """The K copies' outputs, stacked along the rows; as a LowRank with `low_rank` (whose
        input is then dense)."""
        assert not (low_rank and isinstance(x, LowRank)), f"{self.path}: low-rank in and out"
        if plan.cache is not None and self.path in plan.called:
            raise RuntimeError(
                f"module '{self.path}' ran twice in one forward; clean-activation reuse assumes "
                "each decomposed module runs once (set reuse_clean_activations: false)"
            )
        plan.called.add(self.path)
        if plan.record is not None:
            plan.record[self.path] = x.dense() if isinstance(x, LowRank) else x
        K = len(plan.copies)
        rows = x.shape[0] // K
        assert rows * K == x.shape[0], f"{self.path}: batch {x.shape[0]} not a multiple of {K}"
        cache = plan.cache
        pieces: list[Tensor] = []
        low_pieces: list[LowRank] = []
        k = 0
        while k < K:
            mm = plan.copies[k].get(self.path)
            clean = cache is not None and not plan.dirty[k]
            if mm is not None:
                xk = x if K == 1 else _rows(x, k * rows, (k + 1) * rows)
                if low_rank:
                    assert isinstance(xk, Tensor)
                    low_pieces.append(self._replaced_low_rank(xk, mm, cache if clean else None))
                else:
                    pieces.append(self._replaced(xk, mm, cache if clean else None))
                plan.dirty[k] = True
                k += 1
                continue
            # A run of copies that keep the target weights here and agree on cleanliness.
            j = k + 1
            while j < K and self.path not in plan.copies[j] and plan.dirty[j] == plan.dirty[k]:
                j += 1
            if clean:
                assert cache is not None
                if low_rank:
                    clean_in = cache.inputs[self.path]
                    low_pieces.append(LowRank(self._original_terms(clean_in)).repeat(j - k))
                else:
                    y = cache.outputs[self.path]
                    pieces.append(y if j - k == 1 else y.repeat(j - k, *([1] * (y.dim() - 1))))
            elif low_rank:
                xs = _rows(x, k * rows, j * rows)
                assert isinstance(xs, Tensor)
                low_pieces.append(LowRank(self._original_terms(xs)))
            else:
                pieces.append(self._original(_rows(x, k * rows, j * rows)))
            k = j
        if low_rank:
            return LowRank.cat(low_pieces)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _replaced(self, x: Tensor | LowRank, mm: ModuleMask, cache: CleanCache | None) -> Tensor:
        comps = self.components
        if cache is not None:
            assert cache.inputs.shape(self.path) == x.shape, f"{self.path}: cache/batch mismatch"
            a = cache.acts(self.path)
            y: Tensor | None = cache.outputs[self.path]
        else:
            a = self._acts(x)
            y = self._original(x) if (mm.delta is not None or mm.route is not None) else None
        bias = self._bias
        # Masks follow the activations' dtype (bf16 under autocast), so the output keeps it too.
        mask = mm.mask.to(a.dtype)
        if mm.delta is None:
            out = (a * mask) @ comps.get_U()
            if bias is not None:
                out = out + bias
        else:
            assert y is not None
            d = mm.delta.unsqueeze(-1).to(a.dtype)
            out = (a * (mask - d)) @ comps.get_U() + d * y
            if bias is not None:
                out = out + (1 - d) * bias
        if mm.route is not None:
            assert y is not None
            out = torch.where(mm.route.unsqueeze(-1), out, y)
        return out

    def _replaced_low_rank(
        self, x: Float[Tensor, "rows d_in"], mm: ModuleMask, cache: CleanCache | None
    ) -> LowRank:
        """`_replaced` as terms: (a * c_U) @ U + (c_W * x) @ W^T + b, where c_U = m - m_d and
        c_W = m_d (c_U = m, no W term without the delta); a route r keeps the masked output on
        its rows and the target's elsewhere: c_U r and c_W r + (1 - r)."""
        if cache is not None:
            assert cache.inputs.shape(self.path) == x.shape, f"{self.path}: cache/batch mismatch"
            a, x = cache.acts(self.path), cache.inputs[self.path]
        else:
            a = self.components.acts(x)
        coef_u = mm.mask.to(a.dtype)
        coef_w: Tensor | None = None
        if mm.delta is not None:
            d = mm.delta.unsqueeze(-1).to(a.dtype)
            coef_u, coef_w = coef_u - d, d
        if mm.route is not None:
            r = mm.route.unsqueeze(-1).to(a.dtype)
            coef_u = coef_u * r
            coef_w = 1 - r if coef_w is None else coef_w * r + (1 - r)
        terms = [Term(self.path + ".U", a * coef_u, self.components.get_U())]
        if coef_w is None:
            if self._bias is not None:  # the target's bias, keyed as `_original_terms` keys it
                terms.append(bias_term(self.path + ".W", a, self._bias))
            return LowRank(terms)
        return LowRank(terms + self._original_terms(x, coef_w))


@dataclass
class CIOutputs:
    lower: dict[str, Tensor]  # lower-leaky CI: masks and every recon metric
    upper: dict[str, Tensor]  # upper-leaky CI: importance minimality only
    pre_sigmoid: dict[str, Tensor]
    # Inside a compiled step that skipped zero rows: a 0-d bool, False when some module had more
    # nonzero rows than its capacity (the values above are then wrong; the step must be re-run
    # eagerly). None otherwise.
    rows_fit: Tensor | None = None


class ComponentModel(nn.Module):
    """A target whose matched modules are decomposed into subcomponents with CI functions."""

    def __init__(
        self,
        target: nn.Module,
        module_info: list[tuple[str, int]],
        ci_fn_type: CIFnType = "vector_mlp",
        ci_fn_hidden_dims: list[int] | None = None,
        sigmoid_type: SigmoidType = "leaky_hard",
        identity_patterns: list[str] | None = None,
        output_attr: str | None = None,
        tied_pairs: list[tuple[str, str]] | None = None,
        reuse_clean_activations: bool = True,
        output_positions: Literal["all", "last"] = "all",
        low_rank_forward: bool = True,
    ):
        """`output_positions` "last" keeps only the last sequence position of a [batch, seq, ...]
        output: then every output loss and eval compares that position alone."""
        super().__init__()
        for name, p in target.named_parameters():
            if p.requires_grad:
                raise InputError(f"target parameter '{name}' requires grad; freeze the target")
        if identity_patterns:
            insert_identity_operations(target, identity_patterns)
        self.target = target
        self.output_attr = output_attr
        self.output_positions = output_positions
        self.reuse_clean_activations = reuse_clean_activations
        # A target may split its forward at a point before every decomposed module
        # (`forward_prefix`, `forward_from_prefix`): masked forwards that reuse clean activations
        # then start from the clean forward's prefix rather than recomputing it per copy.
        self._splits_forward = hasattr(target, "forward_prefix") and hasattr(
            target, "forward_from_prefix"
        )
        self._holder = _PlanHolder()
        self._lower_sigmoid, self._upper_sigmoid = sigmoid_pair(sigmoid_type)
        hidden = [8] if ci_fn_hidden_dims is None else ci_fn_hidden_dims

        paths_C = expand_module_patterns(target, module_info)
        self.module_paths: list[str] = list(paths_C)
        tied = dict((dst, src) for src, dst in tied_pairs or [])
        self.tied_pairs = [(s, d) for s, d in tied_pairs or [] if s in paths_C and d in paths_C]
        self.components = nn.ModuleDict()
        self.ci_fns = nn.ModuleDict()
        self.wrappers: dict[str, DecomposedModule] = {}
        comps_by_path: dict[str, Components] = {}
        for path, C in paths_C.items():
            module = target.get_submodule(path)
            kind = module_kind(module, path)
            d_in, d_out = _dims(module, kind)
            comps: Components
            if kind == "embedding":
                if ci_fn_type != "mlp":
                    raise InputError(
                        f"embedding '{path}' needs ci_fn_type 'mlp' (got {ci_fn_type})"
                    )
                comps = EmbeddingComponents(d_in, d_out, C)
            elif path in tied and tied[path] in paths_C:
                if tied[path] not in comps_by_path:
                    raise InputError(f"tied source '{tied[path]}' must come before '{path}'")
                src = comps_by_path[tied[path]]
                assert isinstance(src, LinearComponents)
                if (src.d_in, src.d_out, src.C) != (d_out, d_in, C):
                    raise InputError(f"tied modules '{tied[path]}' and '{path}' differ in shape/C")
                comps = TiedLinearComponents(src)
            else:
                comps = LinearComponents(d_in, d_out, C)
            comps_by_path[path] = comps
            self.components[_key(path)] = comps
            self.ci_fns[_key(path)] = make_ci_fn(ci_fn_type, C, d_in, hidden)
            wrapper = DecomposedModule(module, comps, path, kind, self._holder)
            parent_name, _, child = path.rpartition(".")
            parent = target.get_submodule(parent_name) if parent_name else target
            setattr(parent, child, wrapper)
            self.wrappers[path] = wrapper
        self._ci_forward: dict[str, Callable[[Tensor], Tensor]] = {}
        # CI functions evaluated apart on zero rows (`ci_on_nonzero_rows`; `skip_zero_rows`):
        # the capacity per (module, rows per batch), measured on the first such batch.
        self.skip_zero_rows = False
        self._row_capacity: dict[tuple[str, int], int | None] = {}
        # Training steps on the nonzero rows alone (`spd_ray.core.rows`; `compact_zero_rows`),
        # for targets whose rows are independent: the capacity per batch size, measured on the
        # first batch.
        self.compact_zero_rows = False
        self.rows_independent = bool(getattr(target, "rows_independent", False))
        self._batch_capacity: dict[int, int | None] = {}
        # A target that keeps its wide activations as terms (`spd_ray.core.lowrank`: ResidMLP)
        # runs its masked forwards that way, from `low_rank_prefix`: the same function, a
        # fraction of the FLOPs. Only plain linear modules read and write terms.
        self.low_rank = (
            low_rank_forward
            and reuse_clean_activations
            and self._splits_forward
            and hasattr(target, "low_rank_prefix")
            and all(
                w.kind == "linear" and not hasattr(w, "pre_identity")
                for w in self.wrappers.values()
            )
        )

    # -- structure ---------------------------------------------------------------------------

    def C(self, path: str) -> int:
        return self.components[_key(path)].C  # type: ignore[return-value]

    def comps(self, path: str) -> Components:
        return self.components[_key(path)]  # type: ignore[return-value]

    def ci_fn(self, path: str) -> CIFn:
        return self.ci_fns[_key(path)]  # type: ignore[return-value]

    def component_weights(self, path: str) -> Float[Tensor, "C d_out d_in"]:
        """Each subcomponent's rank-one weight, nn.Linear orientation ([C, vocab, d] for
        embeddings)."""
        return self.comps(path).subcomponent_weights()

    def target_weight(self, path: str) -> Float[Tensor, "d_out d_in"]:
        return self.wrappers[path].target_weight()

    def weight_deltas(self) -> dict[str, Tensor]:
        return {p: self.target_weight(p) - self.comps(p).weight() for p in self.module_paths}

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(component params, CI-function params), each shared parameter once."""
        return list(self.components.parameters()), list(self.ci_fns.parameters())

    def compile_ci_fns(self) -> None:
        for path in self.module_paths:
            self._ci_forward[path] = torch.compile(self.ci_fn(path), dynamic=False)

    # -- forwards ----------------------------------------------------------------------------

    def _extract(self, out: Any) -> Tensor:
        attr = self.output_attr
        if attr is not None:
            out = out[int(attr[4:])] if attr.startswith("idx_") else getattr(out, attr)
        if self.output_positions == "last":
            assert out.dim() >= 3, (
                f"output_positions 'last' needs [batch, seq, ...], got {out.shape}"
            )
            out = out[:, -1]
        return out  # type: ignore[no-any-return]

    @contextmanager
    def _with_plan(self, plan: _Plan) -> Iterator[_Plan]:
        assert self._holder.plan is None, "nested ComponentModel forwards are not supported"
        self._holder.plan = plan
        try:
            yield plan
        finally:
            self._holder.plan = None

    def forward(self, batch: Tensor) -> Tensor:
        """The target's output (no masks)."""
        return self._extract(self.target(batch))

    def clean_forward(self, batch: Tensor) -> tuple[Tensor, CleanCache]:
        cache = CleanCache()
        with self._with_plan(_Plan(mode="clean", cache=cache)):
            if self._splits_forward:
                if self.low_rank:
                    cache.prefix = self.target.low_rank_prefix(batch)  # type: ignore[operator]
                else:
                    cache.prefix = self.target.forward_prefix(batch)  # type: ignore[operator]
                if cache.inputs:
                    raise RuntimeError(
                        "the target's forward_prefix ran a decomposed module "
                        f"({', '.join(cache.inputs)}); it must end before every one"
                    )
                raw = self.target.forward_from_prefix(cache.prefix)  # type: ignore[operator]
            else:
                raw = self.target(batch)
        return self._extract(raw), cache

    def masked_forward(
        self,
        batch: Tensor,
        copies: list[dict[str, ModuleMask]],
        cache: CleanCache | None = None,
        record_inputs: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Forward of len(copies) stacked copies of `batch`; copy k replaces the modules in
        copies[k].

        `cache` must come from `clean_forward(batch)` on the same batch; it lets still-clean copies
        skip recomputation. Returns the outputs of all copies stacked along dim 0. `record_inputs`,
        when given, receives every wrapper's (stacked) input.
        """
        K = len(copies)
        assert K >= 1
        for copy in copies:
            for path in copy:
                assert path in self.wrappers, f"unknown module path '{path}'"

        def stack(t: Tensor) -> Tensor:
            return t if K == 1 else t.repeat(K, *([1] * (t.dim() - 1)))

        plan = _Plan(
            mode="masked",
            copies=copies,
            cache=cache if self.reuse_clean_activations else None,
            record=record_inputs,
            dirty=[False] * K,
        )
        with self._with_plan(plan):
            if plan.cache is not None and plan.cache.prefix is not None:
                # Every copy starts from the clean forward's prefix (no module replaced there).
                prefix = plan.cache.prefix
                prefix = prefix.repeat(K) if isinstance(prefix, LowRank) else stack(prefix)
                return self._extract(self.target.forward_from_prefix(prefix))  # type: ignore[operator]
            return self._extract(self.target(stack(batch)))

    # -- causal importances ------------------------------------------------------------------

    def ci_from_cache(
        self,
        cache: CleanCache,
        sampling: Literal["continuous", "binomial"] = "continuous",
        noise: Noise | None = None,
    ) -> CIOutputs:
        lower, upper, pre = {}, {}, {}
        rows_fit: Tensor | None = None
        for path in self.module_paths:
            fn = self.ci_fn(path)
            inp = cache.acts(path) if fn.takes_component_acts else cache.inputs[path]
            z, fit = self._ci_rows(path, self._ci_forward.get(path, fn), inp, cache.inputs)
            if fit is not None:
                rows_fit = fit if rows_fit is None else rows_fit & fit
            z_lower = z
            if sampling == "binomial":
                assert noise is not None, "binomial sampling needs noise"
                u = noise.rand(tuple(z.shape), z.device, z.dtype)
                z_lower = 1.05 * z - 0.05 * u
            lower[path] = self._lower_sigmoid(z_lower)
            upper[path] = self._upper_sigmoid(z)
            pre[path] = z
        return CIOutputs(lower=lower, upper=upper, pre_sigmoid=pre, rows_fit=rows_fit)

    def _ci_rows(
        self, path: str, fn: Callable[[Tensor], Tensor], inp: Tensor, inputs: Activations
    ) -> tuple[Tensor, Tensor | None]:
        """`fn(inp)`, skipping zero rows of the module input where that saves work (an
        embedding's input is token ids, whose zero is a token like any other), and, inside a
        compiled step, whether the rows fit the capacity (see `CIOutputs.rows_fit`)."""
        if not self.skip_zero_rows or self.wrappers[path].kind == "embedding":
            return fn(inp), None
        n = inp.shape[:-1].numel()
        sized = measured_capacity(
            self._row_capacity, (path, n), lambda: nonzero_rows(inputs[path], n)
        )
        if sized is None:  # too few zero rows to skip (measured on the first batch)
            return fn(inp), None
        z, fits = ci_on_nonzero_rows(fn, inp, sized[1], sized[0])
        return z, (fits if torch.compiler.is_compiling() else None)

    def kept_rows(self, batch: Tensor) -> KeptRows | None:
        """The rows a training step on `batch` runs on (`spd_ray.core.rows`): its nonzero rows,
        then zero rows, to a capacity measured on the first batch; None where the step runs on
        every row (not on, rows not independent, a batch that is not [rows, features], too few
        zero rows to pay, or a zero row that does not reach the decomposed modules as zeros:
        `quiet_zero_row`)."""
        if not (self.compact_zero_rows and self.rows_independent):
            return None
        if batch.dim() != 2 or not batch.is_floating_point():
            return None
        n = batch.shape[0]
        # One zero row must stay among the kept ones (`quiet_zero_row`, `KeptRows.batch_sum`).
        sized = measured_capacity(self._batch_capacity, n, lambda: nonzero_rows(batch, n), spare=1)
        if sized is None:
            return None
        return kept_rows(sized[1], sized[0], compiling=torch.compiler.is_compiling())

    def quiet_zero_row(self, cache: CleanCache, kept: KeptRows) -> Tensor:
        """0-d bool: whether every decomposed module's clean input is zero on the last kept row
        (a zero row of the batch). The rows are independent, so then it is on every zero row and
        the masked forwards reconstruct them exactly; a target whose zero rows reach a module as
        something else (a bias before it) is not compacted (`forgo_compaction`)."""
        row = kept.capacity - 1
        quiet = [(cache.inputs.row(p, row) == 0).all() for p in self.module_paths]
        return quiet[0] if len(quiet) == 1 else torch.stack(quiet).all()

    def forgo_compaction(self, batch: Tensor) -> None:
        """Steps on batches of this size run on every row from here on."""
        self._batch_capacity[batch.shape[0]] = None

    def causal_importances(self, batch: Tensor) -> dict[str, Tensor]:
        """Lower-leaky CI values {path: [..., C]} of a batch (continuous sampling)."""
        _, cache = self.clean_forward(batch)
        return self.ci_from_cache(cache).lower


def _rows(x: Tensor | LowRank, start: int, stop: int) -> Tensor | LowRank:
    return x.row_slice(start, stop) if isinstance(x, LowRank) else x[start:stop]


def _key(path: str) -> str:
    return path.replace(".", "-")
