"""Show, Attend and Tell layers: CNN encoder, Bahdanau attention, attentive GRU decoder.

Every hyper-parameter is a constructor argument and every layer implements
`get_config`, so a saved `.keras` model reloads with `safe_mode=True`.
Shapes: B batch, L locations (64), D feature depth (2048), E embedding, U units,
T time steps, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops

PACKAGE = "show_attend_tell"
VARIANCE_FLOOR = 1e-4  # of the mean channel variance (see CNNEncoder.standardize)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CNNEncoder(keras.layers.Layer):
    """Dense + ReLU over each of the L feature locations: (B, L, D) -> (B, L, E).

    With `normalize`, each feature channel is first standardised with a mean
    and variance measured on the training split (`set_feature_stats`), kept as
    non-trainable weights so checkpoints and exports carry them. This makes
    training insensitive to the backbone's output scale (random-init
    InceptionV3 gives features of ~1e-4 that a plain Dense barely separates).
    """

    def __init__(self, embedding_dim: int, normalize: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim
        self.normalize = normalize
        self.fc = keras.layers.Dense(embedding_dim, activation="relu", name="fc")

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        depth = input_shape[-1]
        if self.normalize:  # float32 even under a mixed policy: no autocast on read
            self.feature_mean = self.add_weight(
                shape=(depth,),
                initializer="zeros",
                trainable=False,
                autocast=False,
                name="feature_mean",
            )
            self.feature_variance = self.add_weight(
                shape=(depth,),
                initializer="ones",
                trainable=False,
                autocast=False,
                name="feature_variance",
            )
        self.fc.build(input_shape)

    def set_feature_stats(self, mean: Any, variance: Any) -> None:
        self.feature_mean.assign(ops.cast(mean, self.feature_mean.dtype))
        self.feature_variance.assign(ops.cast(variance, self.feature_variance.dtype))

    def call(self, features: tf.Tensor) -> tf.Tensor:
        if self.normalize:
            features = ops.cast(self.standardize(features), self.compute_dtype)
        return self.fc(features)

    def standardize(self, features: tf.Tensor) -> tf.Tensor:
        """(x - mean) / std per channel, in float32 whatever the compute dtype.

        A channel that hardly varied in the training images (random-init backbones
        leave hundreds constant) would get a near-infinite scale: inf in float16,
        and a huge output for the smallest serve-time activation. Its variance is
        floored at a fraction of the mean channel variance, which caps any scale
        at 1/sqrt(VARIANCE_FLOOR) = 100 times a typical channel's.
        """
        variance = self.feature_variance
        floor = VARIANCE_FLOOR * ops.mean(variance) + 1e-30
        scale = ops.rsqrt(ops.maximum(variance, floor))
        return (ops.cast(features, "float32") - self.feature_mean) * scale

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "embedding_dim": self.embedding_dim,
            "normalize": self.normalize,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class BahdanauAttention(keras.layers.Layer):
    """Additive attention: score_i = V^T tanh(W1 f_i + W2 h).

    `project` computes W1 f once per sequence; `call` then costs one (B, U) x
    (U, U) matmul per step instead of re-projecting all L locations.
    """

    def __init__(self, units: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.units = units
        self.W1 = keras.layers.Dense(units, name="W1")
        self.W2 = keras.layers.Dense(units, name="W2")
        self.V = keras.layers.Dense(1, name="V")

    def build(self, features_shape: tuple[int | None, ...], hidden_dim: int | None = None) -> None:
        self.W1.build(features_shape)
        self.W2.build((None, hidden_dim or self.units))
        self.V.build((None, None, self.units))

    def project(self, features: tf.Tensor) -> tf.Tensor:
        """(B, L, E) -> (B, L, U), once per sequence."""
        return self.W1(features)

    def call(
        self, features: tf.Tensor, projected: tf.Tensor, hidden: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns the context (B, E) and the attention weights alpha (B, L)."""
        h = ops.tanh(projected + ops.expand_dims(self.W2(hidden), 1))  # (B, L, U)
        # V^T h as a product and sum, softmax over the last axis: Dense on a rank-3 input
        # and softmax on axis 1 both transpose with a computed permutation, which XLA
        # cannot compile inside the decoder loop's gradient.
        score = ops.sum(h * self.V.kernel[:, 0], axis=-1) + self.V.bias[0]  # (B, L)
        alpha = ops.softmax(score, axis=-1)  # (B, L)
        context = ops.sum(ops.expand_dims(alpha, -1) * features, axis=1)  # (B, E)
        return context, alpha

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionGRUDecoder(keras.layers.Layer):
    """GRU decoder that reads an attention context at every step.

    x_t = [context_t ; embed(y_{t-1})], h_t = GRU(x_t, h_{t-1}),
    logits_t = fc2(fc1(h_t)), as in TensorFlow's classic tutorial.
    """

    def __init__(
        self, vocab_size: int, embedding_dim: int, units: int, dropout: float = 0.0, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.units = units
        self.dropout = dropout
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")
        self.attention = BahdanauAttention(units, name="attention")
        self.gru = keras.layers.GRUCell(units, recurrent_initializer="glorot_uniform", name="gru")
        self.fc1 = keras.layers.Dense(units, name="fc1")
        self.fc2 = keras.layers.Dense(vocab_size, name="fc2")
        self.drop = keras.layers.Dropout(dropout, name="dropout")

    def build(self, features_shape: tuple[int | None, ...] = (None, None, None)) -> None:
        e, u = self.embedding_dim, self.units
        self.embedding.build((None, None))
        self.attention.build((None, None, e), hidden_dim=u)
        self.gru.build((None, 2 * e))
        self.fc1.build((None, None, u))
        self.fc2.build((None, None, u))

    def initial_state(self, batch_size: tf.Tensor) -> tf.Tensor:
        return ops.zeros((batch_size, self.units), dtype=self.compute_dtype)

    def step(
        self,
        token: tf.Tensor,
        hidden: tf.Tensor,
        features: tf.Tensor,
        projected: tf.Tensor,
        masks: tuple[tf.Tensor, tf.Tensor] | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """One inference step: token (B,) -> logits (B, V), hidden (B, U), alpha (B, L).

        `masks`: this step's dropout, (B, E) on the embedding and (B, U) before the
        output layer, already scaled (sampling under the distribution training scores)."""
        context, alpha = self.attention(features, projected, hidden)
        embedded = self.embedding(token)
        if masks is not None:
            embedded = embedded * ops.cast(masks[0], embedded.dtype)
        hidden, _ = self.gru(ops.concatenate([context, embedded], axis=-1), [hidden])
        out = self.fc1(hidden)
        if masks is not None:
            out = out * ops.cast(masks[1], out.dtype)
        return self.fc2(out), hidden, alpha

    def call(
        self,
        features: tf.Tensor,
        tokens: tf.Tensor,
        training: bool = False,
        masks: tuple[tf.Tensor, tf.Tensor] | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Teacher forcing over decoder inputs (B, T): returns logits (B, T, V), alpha (B, T, L).

        `masks` (B, T, E) and (B, T, U) replace the dropout layer's own draws."""
        projected = self.attention.project(features)  # (B, L, U), once per sequence
        embedded = self.embedding(tokens)  # (B, T, E)
        if masks is None:
            embedded = self.drop(embedded, training=training)
        else:
            embedded = embedded * ops.cast(masks[0], embedded.dtype)
        hidden0 = self.initial_state(ops.shape(tokens)[0])

        def one_step(carry: tuple[tf.Tensor, tf.Tensor], x_t: tf.Tensor):
            hidden, _ = carry
            context, alpha = self.attention(features, projected, hidden)
            hidden, _ = self.gru(ops.concatenate([context, x_t], axis=-1), [hidden])
            return hidden, alpha

        alpha0 = ops.zeros(ops.shape(features)[:2], dtype=self.compute_dtype)
        hiddens, alphas = tf.scan(
            one_step, tf.transpose(embedded, [1, 0, 2]), initializer=(hidden0, alpha0)
        )  # (T, B, U), (T, B, L)
        hiddens = ops.transpose(hiddens, [1, 0, 2])
        alphas = ops.transpose(alphas, [1, 0, 2])
        # The vocabulary projection runs once over all steps: one big matmul.
        out = self.fc1(hiddens)
        if masks is None:
            out = self.drop(out, training=training)
        else:
            out = out * ops.cast(masks[1], out.dtype)
        return self.fc2(out), alphas

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "dropout": self.dropout,
        }
