"""Hugging Face targets: `pretrained_model_class.from_pretrained(pretrained_model_name)`, frozen.

A name is a hub id, a local folder (absolute, `~`-, `.`-relative or an existing relative path,
resolved against the current directory like every other path of a config), or an offline tiny-LM
asset `@tiny-lm/<part>`: `<output root>/assets/tiny-lm/<part>`, built there first with
`make_tiny_lm` (the settings of the build already there, else the default trained ones) when the
part is missing or half-written; only a whole part is accepted. The same convention applies to
`tokenizer_name` and `task_config.dataset_name`, so registry configs can name the offline assets
without knowing the output root.

The ComponentModel reads the model's output through `pretrained_model_output_attr` (`logits` on a
`ModelOutput`, or `idx_<k>` for element k of a tuple output), so no wrapper module is needed; the
KV cache is switched off because every SPD forward is a full-sequence forward.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

from torch import nn

from spd_ray.errors import InputError, NotFoundError

TINY_LM_PREFIX = "@tiny-lm/"


def tiny_lm_root(out_root: Path) -> Path:
    return Path(out_root) / "assets" / "tiny-lm"


def is_local_name(name: str) -> bool:
    """Paths, not hub ids: absolute, home- or dot-relative, or an existing relative path."""
    return name.startswith(("/", "~", ".")) or Path(name).exists()


def _existing_build_args(root: Path) -> tuple[int | None, int]:
    """The `steps` and `seed` of the tiny-LM build already in `root` (steps None: default
    settings), so adding or repairing a part keeps the other parts as they are."""
    from spd_ray.targets.tiny_lm import CORPUS, DEFAULT_STEPS, DONE, LLAMA

    done = root / DONE
    if not done.exists():
        return None, 0
    params = json.loads(done.read_text())["params"]
    steps = params[LLAMA]["steps"]
    return (None if steps == DEFAULT_STEPS[LLAMA] else int(steps)), int(params[CORPUS]["seed"])


def ensure_tiny_lm(root: Path, progress: bool = True) -> None:
    """Build the tiny-LM assets in `root` (once, under a file lock shared by concurrent workers)."""
    from spd_ray.targets.tiny_lm import make_tiny_lm

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".tiny-lm.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if progress:
                print(f"building the tiny-LM assets in {root} (once)", file=sys.stderr)
            steps, seed = _existing_build_args(root)
            make_tiny_lm(root, steps=steps, seed=seed, progress=progress)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_part(root: Path, part: str, name: str, field: str) -> None:
    """A tiny-LM part is accepted only when whole (`tiny_lm.part_complete`)."""
    from spd_ray.targets.tiny_lm import part_complete

    if not part_complete(root, part):
        steps, seed = _existing_build_args(root)
        flags = ("" if steps is None else f" --steps {steps}") + (f" --seed {seed}" if seed else "")
        raise NotFoundError(
            f"{field} {name!r}: the tiny-LM part {root / part} is incomplete (half-written: no "
            f"build marker and no whole last file); rebuild it with "
            f"`spd-ray make-tiny-lm {root}{flags}`"
        )


def resolve_name(name: str, field: str, out_root: Path, progress: bool = True) -> str:
    """A hub id unchanged, a local path made absolute, `@tiny-lm/<part>` resolved (and built when
    missing or incomplete).

    `field` names the config key in errors.
    """
    if name.startswith(TINY_LM_PREFIX):
        from spd_ray.targets.tiny_lm import PARTS, part_complete

        root = tiny_lm_root(out_root)
        rel = name[len(TINY_LM_PREFIX) :]
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise InputError(f"{field} {name!r}: a tiny-LM name is @tiny-lm/<part>[/<file>]")
        part = Path(rel).parts[0] if rel else ""
        path = root / rel
        known = part in PARTS
        if not path.exists() or (known and not part_complete(root, part)):
            ensure_tiny_lm(root, progress)
        if not path.exists():
            raise NotFoundError(f"{field} {name!r}: the tiny-LM assets have no {path}")
        if known:
            _check_part(root, part, name, field)
        return str(path)
    if is_local_name(name):
        path = Path(name).expanduser().resolve()
        if not path.exists():
            raise NotFoundError(f"{field} {name!r}: no such local file or folder ({path})")
        return str(path)
    return name


def _offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def load_hf_model(
    model_class: type, model_class_path: str, name: str, out_root: Path, progress: bool = True
) -> nn.Module:
    """`model_class.from_pretrained(name)` in eval mode with no parameter requiring grad.

    A hub id that cannot be fetched (offline, unknown, no network) fails with a one-line error
    naming `pretrained_model_name` and the id.
    """
    if not hasattr(model_class, "from_pretrained"):
        raise InputError(
            f"pretrained_model_class {model_class_path!r} has no from_pretrained (needed with "
            "pretrained_model_name)"
        )
    resolved = resolve_name(name, "pretrained_model_name", out_root, progress)
    try:
        model = model_class.from_pretrained(resolved)
    except OSError as err:
        hint = " (HF_HUB_OFFLINE is set: only cached or local models load)" if _offline() else ""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"pretrained_model_name {name!r}: {model_class_path}.from_pretrained failed{hint}: "
            f"{reason}"
        ) from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"{model_class_path}.from_pretrained({name!r}) is not a torch module")
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "use_cache"):
        hf_config.use_cache = False
    model.eval()
    model.requires_grad_(False)
    return model


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (None: not declared)."""
    hf_config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int):
            return value
    return None


def vocab_size(model: nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return value if isinstance(value, int) else None
