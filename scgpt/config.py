"""Typed configuration that validates itself.

Hydra composes YAML; these dataclasses are what the code trusts. Every check names the config key
so a user can fix it (``model.d_model``), and runs before any work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from scgpt.config_schema import check_annotated_types
from scgpt.errors import ConfigError

ATTENTION_BACKENDS = ("sdpa", "reference", "flash_attn", "flash_attn4", "cudnn", "flex", "flex_flash")
VALUE_ENCODINGS = ("continuous", "category", "scaling")
CELL_EMB_STYLES = ("cls", "avg-pool", "w-pool")
NORM_SCHEMES = ("post", "pre")
# Domain-specific batch norm: none, on the token inputs, on the encoder outputs, on the cell embedding.
DSBN_PLACES = ("off", "input", "output", "cell")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    _require(value in choices, key, f"unknown value {value!r}; choose one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """Architecture of the scGPT transformer. Defaults are the published whole-human shape."""

    vocab_size: int
    pad_token_id: int
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 12
    d_hid: int = 512
    dropout: float = 0.2
    max_seq_len: int = 1200
    n_bins: int = 51
    pad_value: float = -2.0
    mask_value: float = -1.0
    value_encoding: str = "continuous"
    norm_scheme: str = "post"
    layer_norm_eps: float = 1e-5
    attention_backend: str = "sdpa"
    cell_emb_style: str = "cls"
    explicit_zero_prob: bool = False
    mvc_decoder: bool = True
    n_cls_classes: int = 0  # > 0 adds the classifier head
    n_layers_cls: int = 3
    n_batch_labels: int = 0  # > 0 adds a batch embedding concatenated to the decoders' input
    batch_discriminator: bool = False  # adversarial batch discriminator (needs n_batch_labels)
    n_modalities: int = 0  # > 0 adds a per-token modality embedding
    n_perturbation_flags: int = 0  # > 0 adds a per-token perturbation embedding
    n_conditions: int = 0  # > 0 adds a per-cell condition embedding (e.g. CTRL / STIM) to every token
    dsbn: str = "off"  # per-batch-label BatchNorm: input (before the encoder, as scGPT), output, cell; true = input

    def __post_init__(self) -> None:
        check_annotated_types(ModelConfig, asdict(self), "model")  # model.dropout=high: one line, not a TypeError
        _require(self.vocab_size > 0, "model.vocab_size", "must be positive")
        _require(0 <= self.pad_token_id < self.vocab_size, "model.pad_token_id",
                 f"must be an id inside the vocabulary (0..{self.vocab_size - 1})")
        _require(self.d_model > 0 and self.n_heads > 0, "model.d_model", "d_model and n_heads must be positive")
        _require(self.d_model % self.n_heads == 0, "model.d_model",
                 f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}; pick a multiple")
        _require(self.n_layers >= 1, "model.n_layers", "needs at least one encoder layer")
        _require(self.d_hid >= 1, "model.d_hid", "must be positive")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _require(self.max_seq_len >= 2, "model.max_seq_len",
                 f"is {self.max_seq_len}; needs room for <cls> and at least one gene (>= 2)")
        _require(self.n_bins >= 3, "model.n_bins", "needs at least 3 bins")
        _one_of(self.value_encoding, VALUE_ENCODINGS, "model.value_encoding")
        _one_of(self.norm_scheme, NORM_SCHEMES, "model.norm_scheme")
        _one_of(self.attention_backend, ATTENTION_BACKENDS, "model.attention_backend")
        _one_of(self.cell_emb_style, CELL_EMB_STYLES, "model.cell_emb_style")
        _require(self.n_layers_cls >= 1, "model.n_layers_cls", "must be at least 1")
        _require(self.n_conditions >= 0, "model.n_conditions", "must be 0 (none) or the number of conditions")
        _require(not self.batch_discriminator or self.n_batch_labels > 1, "model.batch_discriminator",
                 "needs model.n_batch_labels > 1 (the number of batches to discriminate)")
        if isinstance(self.dsbn, bool):  # dsbn: true / false (YAML also reads on / off as booleans)
            self.dsbn = "input" if self.dsbn else "off"
        _one_of(self.dsbn, DSBN_PLACES, "model.dsbn")
        _require(self.dsbn == "off" or self.n_batch_labels > 0, "model.dsbn",
                 "needs model.n_batch_labels > 0 (one set of statistics per batch label)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from a config mapping, refusing keys this dataclass does not know."""
        known = {f.name for f in fields(cls)}
        merged = {**dict(values), **overrides}
        unknown = sorted(set(merged) - known)
        _require(not unknown, f"model.{unknown[0] if unknown else ''}",
                 f"unknown key; known keys are {', '.join(sorted(known))}")
        return cls(**merged)
