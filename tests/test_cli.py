"""The `bt` front: every command listed, help without TensorFlow, exit statuses."""

import subprocess
import sys

import pytest

from bt_pipeline.cli import COMMANDS, main


def test_bt_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in listed


def test_infer_help_imports_neither_tensorflow_nor_pandas():
    probe = ("import sys\nfrom bt_pipeline.cli import main\n"
             "try:\n    main(['infer', '--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('tensorflow', 'keras', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_exit_statuses_of_the_front(capsys):
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["manifest", "--no-such-flag"]) == 2


def test_an_internal_error_is_one_line_and_status_3(monkeypatch, capsys):
    import bt_pipeline.data.manifest as manifest

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(manifest, "run_patients", broken)
    assert main(["patients"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["internal error: RuntimeError: boom (bt patients --debug shows where)"]
    assert main(["patients", "--debug"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_bad_input_is_status_2_with_one_line(tmp_path, capsys):
    assert main(["patients", "--manifest", str(tmp_path / "missing.csv")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# --- nothing but an explicit --ship-to writes the shipped models ------------------------------

def _shipped_bytes() -> dict[str, bytes]:
    from bt_pipeline.config import SHIPPED_UNET

    return {p.name: p.read_bytes() for p in sorted(SHIPPED_UNET.parent.iterdir())
            if p.is_file()}


@pytest.mark.integration
@pytest.mark.parametrize("command", ["train-unet", "tune", "evaluate"])
def test_a_command_leaves_the_shipped_models_alone_without_its_flag(
        command, synthetic_root, synthetic_manifest, tiny_models, tmp_path):
    from bt_pipeline.cli import main

    data = ["--data-dir", str(synthetic_root), "--manifest", str(synthetic_manifest)]
    argv = {
        "train-unet": ["train-unet", *data, "--run-dir", str(tmp_path / "run"), "--epochs", "1",
                       "--image-size", "32", "--depth", "2", "--base-filters", "4",
                       "--batch-size", "8"],
        "tune": ["tune", *data, "--trials", "1", "--epochs", "1", "--executions", "1",
                 "--retrain-epochs", "1", "--image-size", "32",
                 "--out-dir", str(tmp_path / "tuning"), "--work-dir", str(tmp_path / "work")],
        "evaluate": ["evaluate", *data, "--splits", "val", "--classifier", str(tiny_models[0]),
                     "--unet", str(tiny_models[1]), "--out", str(tmp_path / "report")],
    }[command]
    before = _shipped_bytes()
    assert main(argv) == 0
    assert _shipped_bytes() == before
    made = {"train-unet": tmp_path / "run" / "unet.keras",
            "tune": tmp_path / "tuning" / "classifier.keras",
            "evaluate": tmp_path / "report" / "summary.md"}[command]
    assert made.is_file()


def test_an_unknown_command_is_refused_even_with_help(capsys):
    assert main(["segmnet", "--help"]) == 2
    assert "unknown command 'segmnet'" in capsys.readouterr().err
