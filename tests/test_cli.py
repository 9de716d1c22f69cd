"""The `bt` front: every command listed, help without TensorFlow, exit statuses."""

import subprocess
import sys

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
