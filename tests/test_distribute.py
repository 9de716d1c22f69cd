import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from bt_pipeline.models.unet import compile_unet
    from bt_pipeline.models.unet import build_unet
    from bt_pipeline.training.callbacks import make_strategy

    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    with strategy.scope():
        model = compile_unet(build_unet(32, 2, 4), 1e-3)
    rng = np.random.default_rng(0)
    x = rng.random((16, 32, 32, 3)).astype("float32")
    y = (rng.random((16, 32, 32, 1)) > 0.8).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    print("replicas", strategy.num_replicas_in_sync)
""")


@pytest.mark.integration
def test_unet_trains_under_mirrored_strategy_on_two_logical_cpus():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas 2" in result.stdout


def test_unknown_strategy_is_an_error():
    import pytest

    from bt_pipeline.training.callbacks import make_strategy

    with pytest.raises(ValueError, match="unknown distribution"):
        make_strategy("tpu-pod")
