"""Compute precision of a built model: float32, or bfloat16 activations with float32 weights.

Keras' ``mixed_bfloat16`` policy keeps each layer's weights in float32 and computes in bfloat16.
The output layer always stays float32, so probabilities, losses and thresholds see float32.
"""

from __future__ import annotations

import keras

from bt_pipeline.runtime import cpu_has_bfloat16

PRECISIONS = ("float32", "mixed_bfloat16")
#: What a training command accepts: a precision, or "auto" (:func:`resolve_precision`).
TRAINING_PRECISIONS = (*PRECISIONS, "auto")


def resolve_precision(name: str) -> str:
    """``auto`` -> ``mixed_bfloat16`` where the CPU has native bfloat16, else ``float32``."""
    if name == "auto":
        return "mixed_bfloat16" if cpu_has_bfloat16() else "float32"
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: float32, mixed_bfloat16 or auto")
    return name


def with_dtype_policy(model: keras.Model, policy: str) -> keras.Model:
    """``model`` rebuilt with every layer but the input and the output on ``policy``, weights
    copied. The output layer is float32 under every policy. Returns ``model`` itself when
    nothing changes."""
    if policy not in PRECISIONS:
        raise ValueError(f"unknown precision {policy!r}: one of {PRECISIONS}")
    config = model.get_config()
    last = config["layers"][-1]["name"]
    changed = False
    for layer in config["layers"]:
        if layer["class_name"] == "InputLayer":
            continue
        wanted = "float32" if layer["name"] == last else policy
        changed |= _policy_name(layer["config"].get("dtype")) != wanted
        layer["config"]["dtype"] = wanted
    if not changed:
        return model
    clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def _policy_name(dtype) -> str:
    """The policy name in a layer config's ``dtype`` entry (a string or a serialized policy)."""
    if isinstance(dtype, dict):
        return dtype.get("config", {}).get("name", "float32")
    return dtype or "float32"
