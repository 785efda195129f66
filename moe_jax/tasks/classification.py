"""Image classification: softmax (or sigmoid, `config.loss`) cross-entropy + MoE aux losses;
top-1/top-5 and routing eval.

Batches: `image float32 [B, H, W, C]`, `label int32 [B]` (+ `soft_label float32 [B, classes]`
when data.pp_train has label ops; + `mask float32 [B]` in eval), from
`moe_jax.data` (tfds + grain). `H = W = data.image_size`, `C = data.channels`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_jax import analysis, data, moe
from moe_jax.analysis import plots
from moe_jax.tasks.base import Batch, Task


def moe_scalars(aux: moe.AuxOutputs, prefix: str) -> dict[str, jax.Array]:
  """Aux losses and routing metrics of every MoE layer as scalars (`{prefix}/moe/<layer>/<name>`).

  Vector metrics (load histograms) are summarised by their coefficient of variation.
  """
  out = {}
  for layer, a in aux.layers.items():
    for name, value in {**a.losses, **a.metrics}.items():
      value = jnp.asarray(value, jnp.float32)
      if value.ndim:
        value, name = jnp.std(value) / (jnp.mean(value) + 1e-9), f"{name}_cv"
      out[f"{prefix}/moe/{layer}/{name}"] = value
  if aux.layers:
    out[f"{prefix}/aux_loss"] = aux.total_loss
  return out


def check_model_matches_data(config) -> None:
  """ValueError unless the model is built for the data's image size and channels (and, when the
  model has a classifier, class count): `data.X` and `model.X` must agree."""
  for field in ("image_size", "channels", "num_classes"):
    if field in config.model and field in config.data and config.model[field] != config.data[field]:
      raise ValueError(
          f"model.{field}={config.model[field]} but data.{field}={config.data[field]}: the model "
          f"must be built for its data; set both (the configs link model.{field} to data.{field}, "
          f"so override data.{field})")


LOSSES = ("softmax_xent", "sigmoid_xent")


def cross_entropy(logits: jax.Array, targets: jax.Array, loss: str) -> jax.Array:
  """Per-example loss `[B]` of `logits [B, classes]` against `targets`: `int [B]` labels or
  `[B, classes]` soft targets. `softmax_xent`: softmax cross-entropy. `sigmoid_xent` (vmoe's
  and big_vision's): the sum over classes of the binary cross-entropy of sigmoid(logits)."""
  if loss not in LOSSES:
    raise ValueError(f"config.loss={loss!r} must be one of {LOSSES}")
  if targets.ndim == 1:
    if loss == "softmax_xent":
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    targets = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
  if loss == "softmax_xent":
    return optax.softmax_cross_entropy(logits, targets)
  return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)


def classification_loss(model: nnx.Module, batch: Batch, loss: str = "softmax_xent"):
  """(loss, metrics): `cross_entropy` (`loss`: one of LOSSES) of `model(batch["image"])` vs the
  targets `soft_label` `[B, classes]` when the batch has them (mixup, cutmix, label smoothing),
  else `label` `[B]`, + MoE aux; accuracy against `label`."""
  logits, aux = moe.capture_aux(model)(batch["image"])
  ce = cross_entropy(logits, batch.get("soft_label", batch["label"]), loss).mean()
  metrics = {"train/loss": ce + aux.total_loss, "train/ce_loss": ce,
             "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             **moe_scalars(aux, "train")}
  return ce + aux.total_loss, metrics


class ClassificationTask(Task):
  """`config.task = "classification"` (the default). `config.loss`, when the config has it, is
  the loss of training and eval (`LOSSES`); configs without it use softmax cross-entropy."""

  name = "classification"
  data_module = data

  def __init__(self, config):
    super().__init__(config)
    self.loss_name = config.get("loss", "softmax_xent")

  def check(self) -> None:
    check_model_matches_data(self.config)
    data.config.validate(self.config.data)
    if self.loss_name not in LOSSES:
      raise ValueError(f"config.loss={self.loss_name!r} must be one of {LOSSES}")

  def check_eval(self, source):
    data.pipeline.check_eval_source(self.config.data, source)

  def batch_shapes(self, batch_size, eval_):
    d = self.config.data
    batch = {"image": jax.ShapeDtypeStruct((batch_size, d.image_size, d.image_size, d.channels),
                                           jnp.float32),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    if eval_:
      batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    elif data.preprocess.train_pipeline(d).soft_labels:
      batch["soft_label"] = jax.ShapeDtypeStruct((batch_size, d.num_classes), jnp.float32)
    return batch

  def loss(self, model, batch):
    return classification_loss(model, batch, self.loss_name)

  def eval_sums(self, model, batch):
    """Sums of loss, top-1/top-5 hits and count; per MoE layer the routing metrics times the
    real-example count, the class x expert matrix `[classes, E]` of routing mass and the class x
    main-expert token counts `[classes, E + 1]` (padding examples masked out)."""
    logits, aux = moe.capture_aux(model)(batch["image"])
    mask, labels = batch["mask"], batch["label"]
    ce = cross_entropy(logits, labels, self.loss_name)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    n = jnp.sum(mask)
    sums = {"loss": jnp.sum(ce * mask), "top1": jnp.sum((top5[:, 0] == labels) * mask),
            "top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask), "count": n}
    classes = jax.nn.one_hot(labels, self.config.data.num_classes) * mask[:, None]
    routing = {layer: {"metrics": {k: jnp.asarray(v, jnp.float32) * n
                                   for k, v in a.metrics.items()},
                       "class_expert": classes.T @ a.example_load,
                       "class_token_expert": classes.T @ a.example_tokens}
               for layer, a in aux.layers.items()}
    return sums, routing

  def eval_results(self, sums):
    """(`eval/...` scalars, per-MoE-layer routing `{layer: {"metrics": averages,
    "class_expert": [classes, E]}}`)."""
    sums, routing = sums
    n = float(sums["count"])
    scalars = {"eval/loss": float(sums["loss"]) / n, "eval/accuracy": float(sums["top1"]) / n,
               "eval/top5_accuracy": float(sums["top5"]) / n, "eval/num_examples": n}
    routing = {layer: {"metrics": {k: np.asarray(v) / n for k, v in r["metrics"].items()},
                       "class_expert": np.asarray(r["class_expert"]),
                       "class_token_expert": np.asarray(r["class_token_expert"])}
               for layer, r in routing.items()}
    return scalars, {"routing": routing}

  def report(self, extras, plot_dir):
    return {"routing": routing_report(extras["routing"], plot_dir)}


def routing_report(routing: dict, plot_dir: str | None = None) -> dict:
  """The routing analysis of an evaluation (and its PNG plots in `plot_dir`)."""
  report = analysis.layer_report({k: r["class_expert"] for k, r in routing.items()},
                                 {k: r["metrics"] for k, r in routing.items()},
                                 class_token_expert={k: r["class_token_expert"]
                                                     for k, r in routing.items()})
  if plot_dir is not None and routing and jax.process_index() == 0:
    report["plots"] = plots.plot_report(report, plot_dir)
  return report
