"""`BiMaskConfig`: every setting of Bi-Mask N:M sparse training in one validated dataclass."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .modes import MODES, SEED_MODE_NAMES

CONFIG_NAME = "bimask_config.json"
# The state-dict key of each sparse layer's backward-mask row permutation (saved so a resumed run keeps it).
PERMUTATION_KEY = "bimask_permutation"

# Row-permutation searches of the backward mask (implemented in bimask_hf.search).
PERMUTATION_SEARCHES: tuple[str, ...] = ("identity", "random", "random_fresh", "swap", "matched")
# How ties between equal magnitudes are broken when N of M are kept (implemented in bimask_hf.masks).
TIE_BREAKS: tuple[str, ...] = ("low", "high")

GROUP_LAYOUTS = ("channels_last", "flat")

# Fields that define a sparse model's layers and masks; the rest (decay, permutation schedule, seed) only
# steer its training and may change between runs of the same model.
STRUCTURE_FIELDS = ("n", "m", "mode", "density", "group_layout", "target_modules", "exclude_modules")

# Keys that bimask-hf writes into bimask_config.json next to the fields (save_sparse_model's metadata).
METADATA_KEYS = frozenset(
    {"sparse_layers", "pattern", "library_version", "model_family", "weights_format", "compression"}
)


def check_nm_pattern(n: int, m: int, owner: str = "") -> None:
    """Check an N:M pattern: ``n`` and ``m`` integers with ``1 <= n <= m`` (the one N:M argument check).

    Args:
        n (`int`): Weights kept per group.
        m (`int`): Group size.
        owner (`str`, *optional*, defaults to `""`): Starts the message (e.g. ``"BiMaskConfig"``), so the
            user knows which settings to fix.

    Raises:
        ValueError: If the pattern is not valid.
    """
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)) or not 1 <= n <= m:
        raise ValueError(
            f"{owner + ': ' if owner else ''}Invalid N:M pattern n={n!r}, m={m!r}: need integers with 1 <= N <= M "
            "(n must be <= m: N:M keeps N of every M weights, e.g. 2:4)."
        )

#: Fields a preset decides, with the library's own defaults (used without a preset). Their dataclass
#: default is None ("not set"), so that a value set together with a preset can be told apart and refused.
PRESET_FIELD_DEFAULTS: dict[str, Any] = {
    "group_layout": "channels_last",
    "tie_break": "low",
    "permutation_search": "matched",
    "num_permutations": 100,
    "decay_per_sample": False,
    "sparse_stem": False,
}

#: ``preset="paper"``: the algorithm of the paper's released code (docs/method.md, "The paper preset").
#: ``num_permutations`` is the paper's own flag (``--greedy_num``, 10 by default, 100 in its ImageNet and
#: DeiT commands), so it may be set with the preset; ``sparse_stem`` is None: the preset sparsifies the
#: stem where the paper's models did (3x3 stems, i.e. its CIFAR models), see :func:`BiMaskConfig.stem_is_sparse`.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "group_layout": "flat",
        "tie_break": "high",
        "permutation_search": "random_fresh",
        "num_permutations": 10,
        "decay_per_sample": True,
        "sparse_stem": None,
    },
}
# Fields a user may still set with a preset (hyperparameters the paper's scripts take as flags).
_PRESET_TUNABLE = frozenset({"num_permutations"})


@dataclass
class BiMaskConfig:
    """Configuration of N:M sparse training with Bi-directional Masks.

    Saved as ``bimask_config.json`` next to the model weights, so a sparse checkpoint records how it
    was made and can be re-patched with the same settings. Each field is documented by its ``help``
    (what ``--help`` shows); the fields a preset decides default to None ("not set").

    Raises:
        ValueError: If a field has a wrong type or value, or is set to a value other than its preset's.
    """

    n: int = field(default=2, metadata={"help": "Weights kept in every group of M (the N of N:M)."})
    m: int = field(default=4, metadata={"help": "Group size (the M of N:M)."})
    mode: str = field(
        default="bimask",
        metadata={
            "help": "How the mask acts: dense | srste | bimask | transposable | pre | post "
            "(the seed's m1/m2/m3/m4 are accepted as aliases)."
        },
    )
    decay: float = field(
        default=2e-4, metadata={"help": "SR-STE decay on pruned weights: adds decay*(1-Mf)*W to dL/dW."}
    )
    permutation_interval: int = field(
        default=100,
        metadata={"help": "Optimizer steps between backward-mask permutation refreshes (the seed's --iter)."},
    )
    num_permutations: int | None = field(
        default=None,
        metadata={
            "help": "Candidates of the random permutation searches (the paper's --greedy_num); default 100, "
            "10 with preset 'paper' (its CIFAR default; its ImageNet and DeiT commands pass 100)."
        },
    )
    permutation_search: str | None = field(
        default=None,
        metadata={
            "help": "Row-permutation search for the backward mask: 'matched' (vectorised local search with "
            "matched group pairs, default), 'swap' (random pairs), 'random' (best of the current and K-1 random "
            "ones), 'random_fresh' (the paper's: best of K fresh random ones) or 'identity'."
        },
    )
    group_layout: str | None = field(
        default=None,
        metadata={
            "help": "Column order of conv weights for N:M groups: 'channels_last' ((kh, kw, c): groups run "
            "along input channels, as sparse tensor cores expect; default) or 'flat' (PyTorch's (c, kh, kw), "
            "the paper's)."
        },
    )
    tie_break: str | None = field(
        default=None,
        metadata={
            "help": "Which of equal |W| a mask keeps: 'low' (the lower index, default) or 'high' (the higher "
            "one, and in Mb pruned entries tie with kept exact zeros: the paper's released code)."
        },
    )
    decay_per_sample: bool | None = field(
        default=None,
        metadata={
            "help": "Add the SR-STE decay once per sample of a Linear layer's batched input (x of shape "
            "(B, T, C): B times), as the paper's DeiT code does; default False (once per backward pass)."
        },
    )
    sparse_stem: bool | None = field(
        default=None,
        metadata={
            "help": "Sparsify the stem (first conv) too; default False. Preset 'paper' decides it per model "
            "(sparse 3x3 stems, as its CIFAR models; dense ImageNet stems and patch embeddings)."
        },
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": "'paper': the paper's released algorithm (flat groups, its tie order, best of "
            "num_permutations fresh random permutations, per-sample decay, its stems). Setting a field the "
            "preset decides to another value is an error."
        },
    )
    density: float | None = field(
        default=None,
        metadata={"help": "If set, use unstructured top-|W| masks keeping this share of each layer instead of N:M."},
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Layers to sparsify: a string is a full regex match on the qualified module name, a list "
            "matches exact names or name suffixes (on the command line: comma-separated names, or "
            "'re:<regex>'). None = every eligible Linear/Conv2d but stem and head."
        },
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Layers never to sparsify, matched like target_modules."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the permutation search (identical on every rank)."})

    def __post_init__(self) -> None:
        self._apply_preset()
        self.mode = SEED_MODE_NAMES.get(self.mode, self.mode)
        for name in ("n", "m", "permutation_interval", "num_permutations", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"BiMaskConfig.{name} must be an integer, got {value!r}.")
        check_nm_pattern(self.n, self.m, owner="BiMaskConfig")
        if self.mode not in MODES:
            raise ValueError(f"BiMaskConfig.mode must be one of {MODES} (or m1..m4), got {self.mode!r}.")
        if self.permutation_search not in PERMUTATION_SEARCHES:
            raise ValueError(
                f"BiMaskConfig.permutation_search must be one of {PERMUTATION_SEARCHES}, "
                f"got {self.permutation_search!r}."
            )
        if self.group_layout not in GROUP_LAYOUTS:
            raise ValueError(
                f"BiMaskConfig.group_layout must be one of {GROUP_LAYOUTS}, got {self.group_layout!r}."
            )
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"BiMaskConfig.tie_break must be one of {TIE_BREAKS}, got {self.tie_break!r}.")
        for name in ("decay_per_sample", "sparse_stem"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (value is None and self.preset is not None)):
                raise ValueError(f"BiMaskConfig.{name} must be True or False, got {value!r}.")
        if self.permutation_interval < 1:
            raise ValueError(
                f"BiMaskConfig.permutation_interval must be >= 1, got {self.permutation_interval}."
            )
        if self.num_permutations < 1:
            raise ValueError(f"BiMaskConfig.num_permutations must be >= 1, got {self.num_permutations}.")
        if not isinstance(self.decay, (int, float)) or self.decay < 0:
            raise ValueError(f"BiMaskConfig.decay must be a float >= 0, got {self.decay!r}.")
        self.decay = float(self.decay)
        if self.density is not None:
            if not isinstance(self.density, (int, float)) or not 0.0 < self.density <= 1.0:
                raise ValueError(f"BiMaskConfig.density must be in (0, 1], got {self.density!r}.")
            self.density = float(self.density)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set)):
                value = sorted(value)
            if value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"BiMaskConfig.{name} must be a regex string or a list of names, got {value!r}.")
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise ValueError(f"BiMaskConfig.{name} must hold module-name strings, got {value!r}.")
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(
                        f"BiMaskConfig.{name} is not a valid regular expression: {value!r} ({err}). A string is a "
                        "full regex match on module names (on the command line 're:<regex>'); a list / comma-separated "
                        "names match exact names or name suffixes."
                    ) from None
            setattr(self, name, value)

    def _apply_preset(self) -> None:
        """Fill the fields a preset decides (None = not set) with the preset's values, or the defaults;
        a field set to a value other than the preset's is an error naming both."""
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"BiMaskConfig.preset must be one of {tuple(PRESETS)} or None, got {self.preset!r}.")
        chosen = PRESETS.get(self.preset or "", {})
        for name, default in PRESET_FIELD_DEFAULTS.items():
            value = getattr(self, name)
            if name not in chosen:
                setattr(self, name, default if value is None else value)
                continue
            wanted = chosen[name]
            if value is None or value == wanted or name in _PRESET_TUNABLE:
                setattr(self, name, wanted if value is None else value)
                continue
            raise ValueError(
                f"BiMaskConfig: preset={self.preset!r} sets {name}={wanted!r}"
                + (" (decided per model)" if wanted is None else "")
                + f", but {name}={value!r} was given. Drop one of the two: the preset reproduces the paper's "
                "algorithm as a whole (docs/method.md lists what it sets)."
            )

    def stem_is_sparse(self, stem: Any) -> bool:
        """Whether the stem module ``stem`` is sparsified.

        That is ``sparse_stem``, or under ``preset="paper"`` the paper's choice: its CIFAR models build their
        3x3 stem conv with its N:M conv, its ImageNet ResNets (7x7 stem) and DeiT (patch embedding) keep the
        stem dense.

        Args:
            stem (`nn.Module`): The stem (a Linear/Conv2d).

        Returns:
            `bool`: True when the stem is sparsified.
        """
        if self.sparse_stem is not None:
            return self.sparse_stem
        return tuple(getattr(stem, "kernel_size", ())) == (3, 3)

    @property
    def pattern(self) -> str:
        """Human name of the sparsity pattern, e.g. ``"2:4"`` or ``"50% unstructured"``."""
        if self.density is not None:
            return f"{self.density:.0%} unstructured"
        return f"{self.n}:{self.m}"

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict.

        Returns:
            `dict[str, Any]`: Field name to value.
        """
        return asdict(self)

    def differences(self, other: BiMaskConfig, fields: Iterable[str] | None = None) -> dict[str, tuple[Any, Any]]:
        """The fields whose values differ between this config and ``other``.

        Args:
            other: The config to compare with.
            fields: The field names to compare (default: all).

        Returns:
            ``{name: (value here, value in other)}`` for every differing field, in field order.
        """
        mine, theirs = self.to_dict(), other.to_dict()
        names = list(mine) if fields is None else [name for name in mine if name in set(fields)]
        return {name: (mine[name], theirs[name]) for name in names if mine[name] != theirs[name]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BiMaskConfig:
        """Build a config from a dict of its fields.

        The metadata keys that bimask-hf saves next to them in ``bimask_config.json`` (:data:`METADATA_KEYS`)
        are skipped, any other key is an error (a typo).

        Args:
            data (`dict[str, Any]`): Field name to value.

        Returns:
            `BiMaskConfig`: The config.

        Raises:
            ValueError: For an unknown key (naming the closest field), or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - METADATA_KEYS)
        if unknown:
            hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, names, n=1))
                     else repr(k) for k in unknown]
            raise ValueError(
                f"Unknown BiMaskConfig key(s): {', '.join(hints)}. Valid fields: {', '.join(sorted(names))}."
            )
        return cls(**{k: v for k, v in data.items() if k in names})

    def save_pretrained(self, save_directory: str | os.PathLike, **extra: Any) -> str:
        """Write ``bimask_config.json`` (sorted keys) into ``save_directory``, creating it if needed.

        Args:
            save_directory (`str` or `os.PathLike`): The folder.
            **extra: Further keys stored next to the fields.

        Returns:
            `str`: The path of the written file.
        """
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        data = {**self.to_dict(), **extra}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def load_json(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
        """The raw contents of ``bimask_config.json`` from a folder, a file path or a Hub repo id.

        Args:
            path_or_repo_id (`str` or `os.PathLike`): A folder holding the file, the file
                itself, or a Hub repo id.
            **hub_kwargs: Passed to ``huggingface_hub.hf_hub_download`` for a repo id (``revision``,
                ``token``, ...).

        Returns:
            `dict[str, Any]`: The JSON object, metadata keys included.

        Raises:
            FileNotFoundError: If a folder has no ``bimask_config.json``.
        """
        path = os.fspath(path_or_repo_id)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"No {CONFIG_NAME} in folder {path_or_repo_id!r}: it was not saved by bimask-hf "
                    "(save with BiMaskConfig.save_pretrained or bimask_hf.save_sparse_model)."
                )
        elif not os.path.isfile(path):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id=path, filename=CONFIG_NAME, **hub_kwargs)
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> BiMaskConfig:
        """Load ``bimask_config.json`` from a local folder or a Hub repo id.

        Args:
            path_or_repo_id (`str` or `os.PathLike`): As in :meth:`load_json`.
            **hub_kwargs: As in :meth:`load_json`.

        Returns:
            `BiMaskConfig`: The config (metadata keys skipped).
        """
        return cls.from_dict(cls.load_json(path_or_repo_id, **hub_kwargs))


# Command-line spellings of the paper scripts' flags, per field.
CLI_ALIASES = {
    "n": ["--N"],
    "m": ["--M"],
    "mode": ["--mask_mode"],
    "permutation_interval": ["--iter"],
    "num_permutations": ["--greedy_num"],
    "density": ["--random_mask_ratio"],
    "target_modules": ["--nm_layers"],
}
# Fields the training arguments take from elsewhere: the Trainer's own ``--seed`` seeds the search.
_NOT_ARGUMENTS = ("seed",)
# Module patterns are one string on the command line (``parse_module_list`` turns it into a list or regex).
_ARGUMENT_TYPES: dict[str, Any] = {"target_modules": str | None, "exclude_modules": str | None}


def _argument_fields() -> list[tuple[str, Any, Any]]:
    fields = []
    for f in dataclasses.fields(BiMaskConfig):
        if f.name in _NOT_ARGUMENTS:
            continue
        metadata = dict(f.metadata)
        if f.name in CLI_ALIASES:
            metadata["aliases"] = CLI_ALIASES[f.name]
        annotation = _ARGUMENT_TYPES.get(f.name) or eval(f.type, {})  # noqa: S307 - our own annotations
        fields.append((f.name, annotation, field(default=f.default, metadata=metadata)))
    return fields


#: Every ``BiMaskConfig`` field (but ``seed``) as a dataclass mixin for ``HfArgumentParser``, with the same
#: defaults and help texts, plus the paper flags as aliases. ``BiMaskTrainingArguments`` inherits it, so
#: the settings are declared once, here, in ``BiMaskConfig``.
BiMaskConfigArguments = dataclasses.make_dataclass("BiMaskConfigArguments", _argument_fields())
BiMaskConfigArguments.__module__ = __name__
BiMaskConfigArguments.__doc__ = "The fields of :class:`BiMaskConfig` as command-line arguments (generated)."

ARGUMENT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(BiMaskConfigArguments))
