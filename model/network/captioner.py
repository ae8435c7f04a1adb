"""The Show-Attend-Tell captioner (encoder + attentive decoder) and its training loss.

The model is built from its config alone (all variables created in the
constructor), so a `.keras` file or a checkpoint restores it without data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import keras
import tensorflow as tf
from keras import ops

from model.defaults import PRESETS  # noqa: F401 - re-exported
from model.io.formats import FEATURE_SHAPE
from model.network.layers import PACKAGE, AttentionGRUDecoder, CNNEncoder
from model.text.vocab import PAD_ID


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the captioner; saved with every checkpoint and export."""

    vocab_size: int = 5000
    embedding_dim: int = 256  # the tutorial's sizes
    units: int = 512
    dropout: float = 0.0
    attention_penalty: float = 1.0  # lambda of the doubly stochastic regulariser; 0 = off
    normalize_features: bool = True  # per-channel standardisation from train statistics
    feature_shape: tuple[int, int] = field(default=FEATURE_SHAPE)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "feature_shape": list(self.feature_shape)}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ShowAttendTell(keras.Model):
    """features (B, L, D) + decoder input tokens (B, T) -> logits (B, T, V), alpha (B, T, L)."""

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 256,
        units: int = 512,
        dropout: float = 0.0,
        attention_penalty: float = 1.0,
        normalize_features: bool = True,
        feature_shape: tuple[int, int] | list[int] = FEATURE_SHAPE,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.config = ModelConfig(
            vocab_size,
            embedding_dim,
            units,
            dropout,
            attention_penalty,
            normalize_features,
            tuple(feature_shape),
        )
        self.encoder = CNNEncoder(embedding_dim, normalize=normalize_features, name="encoder")
        self.decoder = AttentionGRUDecoder(
            vocab_size, embedding_dim, units, dropout, name="decoder"
        )
        self.encoder.build((None, *self.config.feature_shape))
        self.decoder.build()
        self.built = True

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> ShowAttendTell:
        return cls(**config.to_dict())

    def encode(self, features: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(B, L, D) -> encoded (B, L, E) and attention projection (B, L, U)."""
        encoded = self.encoder(ops.cast(features, self.compute_dtype))
        return encoded, self.decoder.attention.project(encoded)

    def call(
        self,
        inputs: tuple[tf.Tensor, tf.Tensor],
        training: bool = False,
        masks: tuple[tf.Tensor, tf.Tensor] | None = None,
    ):
        """(features (B, L, D), tokens (B, T)) -> logits (B, T, V), alphas (B, T, L);
        `masks`: explicit dropout masks (see `AttentionGRUDecoder.call`)."""
        features, tokens = inputs
        encoded = self.encoder(ops.cast(features, self.compute_dtype))
        return self.decoder(encoded, tokens, training=training, masks=masks)

    def get_config(self) -> dict[str, Any]:
        base = super().get_config()
        return {
            **{k: v for k, v in base.items() if k in ("name", "trainable", "dtype")},
            **self.config.to_dict(),
        }


class LossParts(NamedTuple):
    """Sums over one (replica's) batch; divide by global counts to get the loss."""

    cross_entropy: tf.Tensor  # sum of token CE over real (non-pad) targets
    penalty: tf.Tensor  # sum over captions of sum_i (1 - sum_t alpha_ti)^2
    tokens: tf.Tensor  # number of real target tokens
    captions: tf.Tensor


def loss_parts(logits: tf.Tensor, alphas: tf.Tensor, targets: tf.Tensor) -> LossParts:
    """Masked cross-entropy and attention penalty for teacher-forced outputs.

    Args:
      logits: (B, T, V) predictions for `targets`.
      alphas: (B, T, L) attention weights of each step.
      targets: (B, T) next tokens, `<pad>` (0) where the caption has ended.
    """
    mask = ops.cast(ops.not_equal(targets, PAD_ID), "float32")  # (B, T)
    ce = keras.losses.sparse_categorical_crossentropy(
        targets, ops.cast(logits, "float32"), from_logits=True
    )  # (B, T)
    # Doubly stochastic attention (Xu et al. eq. 14): each location should get
    # about one unit of attention over the caption's real steps.
    coverage = ops.sum(ops.cast(alphas, "float32") * mask[..., None], axis=1)  # (B, L)
    penalty = ops.sum(ops.square(1.0 - coverage), axis=-1)  # (B,)
    has_tokens = ops.cast(ops.sum(mask, axis=1) > 0, "float32")
    return LossParts(
        cross_entropy=ops.sum(ce * mask),
        penalty=ops.sum(penalty * has_tokens),
        tokens=ops.sum(mask),
        captions=ops.sum(has_tokens),
    )


def combine_loss(parts: LossParts, attention_penalty: float, global_tokens: tf.Tensor) -> tf.Tensor:
    """The per-token loss: (sum CE + lambda * sum penalty) / global real tokens.

    The paper adds lambda * penalty to each caption's summed negative
    log-likelihood; dividing both by the token count keeps that ratio while
    reporting a per-token loss. Dividing by the *global* count (all replicas)
    makes N replicas' summed gradients equal one device's.
    """
    total = parts.cross_entropy + attention_penalty * parts.penalty
    return total / ops.maximum(global_tokens, 1.0)
