"""The induction-heads toy target: an attention-only transformer (method.md §6), and its trainer.

tokens -> token_embed (vocab_size + 2 rows: BOS, the ordinary tokens, the induction token S) ->
n_layers residual blocks `x += attn(x)` -> unembed. Attention is shortformer-style: the sinusoidal
positional encoding is added to the queries and keys only, never to the residual stream, which
makes induction heads form much faster. q/k/v/out projections are bias-free; causal SDPA.

The forward returns the logits of every position, [batch, seq, vocab_size + 2]: the decomposition's
KL loss compares all of them and averages over batch and positions, as the reference does
(`task_config.output_positions: last` keeps the last position only). Training's CE and the
accuracy use the last position, where the label of the induction task lives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm import tqdm

from spd_ray.config import IHTargetConfig
from spd_ray.data.ih import InductionTask
from spd_ray.errors import InputError

# Training stops once a fixed held-out batch is predicted this well, and fails below the minimum.
STOP_ACCURACY = 0.99
MIN_ACCURACY = 0.9
CHECK_EVERY = 100
CHECK_BATCH = 1024
CHECK_SEED_OFFSET = 7919


def sinusoidal_encoding(seq_len: int, d_model: int) -> Float[Tensor, "seq_len d_model"]:
    """The Transformer paper's encoding: sin on even, cos on odd dimensions."""
    pos = torch.arange(seq_len, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(1e4) / d_model))
    pe = torch.zeros(seq_len, d_model)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return pe


class ShortformerAttention(nn.Module):
    """Causal multi-head self-attention with the positional encoding added to Q and K only."""

    def __init__(self, d_model: int, n_heads: int, seq_len: int, positional: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise InputError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.positional = positional
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.register_buffer("pe", sinusoidal_encoding(seq_len, d_model), persistent=False)
        self.pe: Tensor

    def forward(self, x: Float[Tensor, "batch seq d_model"]) -> Float[Tensor, "batch seq d_model"]:
        b, s, d = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.positional:
            pe = self.pe[:s].to(x.dtype)
            q, k = q + pe, k + pe
        v = self.v_proj(x)
        # [b, s, d] -> [b, heads, s, d_head]
        q, k, v = (t.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        # Under autocast the projections may come out in different dtypes; SDPA needs one.
        dtype = v.dtype
        ctx = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v, is_causal=True)
        return self.out_proj(ctx.transpose(1, 2).reshape(b, s, d))


class IHMLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_mlp)
        self.down = nn.Linear(d_mlp, d_model)

    def forward(self, x: Float[Tensor, "batch seq d_model"]) -> Float[Tensor, "batch seq d_model"]:
        return self.down(F.gelu(self.up(x)))


class IHBlock(nn.Module):
    """x += attn(ln1(x)); with use_mlp, x += mlp(ln2(x)) (LayerNorms only with use_layer_norm).
    Absent options register no module, so the default block is exactly the attention-only one."""

    def __init__(self, cfg: IHTargetConfig):
        super().__init__()
        self.attn = ShortformerAttention(
            cfg.d_model, cfg.n_heads, cfg.seq_len, cfg.use_positional_encoding
        )
        self.ln1 = nn.LayerNorm(cfg.d_model) if cfg.use_layer_norm else None
        self.mlp = IHMLP(cfg.d_model, cfg.d_mlp) if cfg.use_mlp else None
        self.ln2 = nn.LayerNorm(cfg.d_model) if cfg.use_layer_norm and cfg.use_mlp else None

    def forward(self, x: Float[Tensor, "batch seq d_model"]) -> Float[Tensor, "batch seq d_model"]:
        x = x + self.attn(self.ln1(x) if self.ln1 is not None else x)
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x) if self.ln2 is not None else x)
        return x


class InductionTransformer(nn.Module):
    """Attention-only transformer; decomposable modules `token_embed`,
    `blocks.<i>.attn.{q,k,v,out}_proj` and `unembed`."""

    def __init__(self, config: IHTargetConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.model_type = config.model_type
        n_tokens = config.vocab_size + 2  # + BOS and the induction token
        self.token_embed = nn.Embedding(n_tokens, config.d_model)
        self.blocks = nn.ModuleList([IHBlock(config) for _ in range(config.n_layers)])
        self.ln_final = nn.LayerNorm(config.d_model) if config.use_layer_norm else None
        self.unembed = nn.Linear(config.d_model, n_tokens, bias=False)
        gen = generator if generator is not None else torch.Generator().manual_seed(config.seed)
        with torch.no_grad():  # torch's default inits, drawn from an explicit generator
            self.token_embed.weight.normal_(generator=gen)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    bound = 1.0 / math.sqrt(module.in_features)
                    module.weight.uniform_(-bound, bound, generator=gen)
                    if module.bias is not None:  # the MLP's (the attention is bias-free)
                        module.bias.uniform_(-bound, bound, generator=gen)

    def residual(self, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq d_model"]:
        assert tokens.dim() == 2, f"expected (batch, seq) tokens, got {tuple(tokens.shape)}"
        assert tokens.shape[1] <= self.config.seq_len, f"sequence longer than {self.config.seq_len}"
        x = self.token_embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x) if self.ln_final is not None else x

    def forward(self, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq n_tokens"]:
        """Logits at every position."""
        return self.unembed(self.residual(tokens))

    def last_logits(self, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch n_tokens"]:
        """Logits at the last position only (training and accuracy)."""
        return self.unembed(self.residual(tokens)[:, -1])


@torch.no_grad()
def ih_accuracy(
    model: InductionTransformer, task: InductionTask, batch_size: int, generator: torch.Generator
) -> float:
    """Fraction of a drawn batch whose last-position argmax is the induction label."""
    tokens, labels = task.generate_batch(batch_size, generator)
    return float((model.last_logits(tokens).argmax(-1) == labels).float().mean())


def ih_lr(cfg: IHTargetConfig, step: int) -> float:
    """The target trainer's learning rate at 0-based `step`: linear warmup to cfg.lr over
    lr_warmup_steps, then constant, or a cosine / linear decay reaching 0 at the last step."""
    warm = min(1.0, (step + 1) / max(cfg.lr_warmup_steps, 1))
    if cfg.lr_schedule == "constant" or step < cfg.lr_warmup_steps:
        return cfg.lr * warm
    span = max(cfg.steps - 1 - cfg.lr_warmup_steps, 1)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress)


def train_ih(cfg: IHTargetConfig, progress: bool = False) -> InductionTransformer:
    """Train an IH target: AdamW (weight decay cfg.weight_decay), lr warmed up linearly over
    lr_warmup_steps then constant, CE of the last-position logits against the induction label, on
    sequences with the widest prefix window (seq_len - 3).

    `cfg.steps` is a cap: every CHECK_EVERY steps the model is scored on a fixed held-out batch and
    training stops once it reaches STOP_ACCURACY. Guarantee: the returned model predicts at least
    MIN_ACCURACY of that batch (chance is 1 / vocab_size); otherwise this raises.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    model = InductionTransformer(cfg, generator=gen)
    task = InductionTask(cfg.vocab_size, cfg.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    check_seed = cfg.seed + CHECK_SEED_OFFSET
    accuracy = 0.0
    bar = tqdm(range(cfg.steps), desc=f"ih seed {cfg.seed}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = ih_lr(cfg, step)
        tokens, labels = task.generate_batch(cfg.batch_size, gen)
        loss = F.cross_entropy(model.last_logits(tokens), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == cfg.steps:
            check = torch.Generator().manual_seed(check_seed)
            accuracy = ih_accuracy(model, task, CHECK_BATCH, check)
            bar.set_postfix(loss=f"{loss.item():.3g}", acc=f"{accuracy:.3f}")
            if accuracy >= STOP_ACCURACY:
                break
    bar.close()
    if progress:
        tqdm.write(f"IH target: last-position accuracy {accuracy:.3f} after {step + 1} steps")
    if accuracy < MIN_ACCURACY:
        raise RuntimeError(
            f"IH target reached last-position accuracy {accuracy:.3f} < {MIN_ACCURACY} after "
            f"{cfg.steps} steps (chance {1 / cfg.vocab_size:.3f}); raise target_model.steps or lr"
        )
    return model.eval()
