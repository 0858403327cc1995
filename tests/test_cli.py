"""The command line's conventions: --version, help on every option, one name for a search
argument, `validate`, YAML errors with their position, hints that run as printed, and the
tests' own rule for missing system packages."""

import os
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_tune import load_backbone
from ssl_tune.cli import build_parser, main
from ssl_tune.data.loader import Normalizer
from ssl_tune.preprocess import InputContract, Preprocess
from tests.conftest import ROOT, cli_env, on_ci, require_system, run_cli, write_spec


def subcommands() -> dict:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


def test_version_is_the_installed_packages():
    proc = run_cli(["--version"], cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ssl-tune {version('ssl-tune')}"


def test_every_command_and_option_has_help():
    for name, command in subcommands().items():
        assert command.description, name
        for action in command._actions:
            assert action.help, f"ssl-tune {name} {'/'.join(action.option_strings) or action.dest}: no help"
    assert build_parser().format_help().startswith("usage: ssl-tune")
    assert "--host" in subcommands()["ui"].format_help() and "127.0.0.1" in subcommands()["ui"].format_help()
    assert "--set" in subcommands()["train"].format_help()


def test_one_name_for_a_search_argument_across_commands():
    for name in ("resume", "results", "export"):
        (positional,) = [a for a in subcommands()[name]._actions if not a.option_strings and a.dest != "help"]
        assert (positional.dest, positional.metavar) == ("experiment_or_run", "EXPERIMENT_OR_RUN"), name


def test_validate_prints_what_a_search_would_do_without_starting_one(tmp_path, twist_spec_path, cli_here):
    status, out, err = cli_here("validate", twist_spec_path, "--set", "search.num_samples=6")
    assert status == 0, err
    for path in ("optimizer.lr", "method.lam1", "method.lam2", "method.tau"):
        assert f"  {path}" in out
    assert "method.tau    loguniform 0.25 to 2; default 1.0" in out
    # 6 trials with ASHA rungs at 2 and 6 (after the warm-up; factor 3): 6 x (2 + 4/3 + 2/9) = 21.3 epochs expected
    assert "trials: 6 in the search" in out and "then at most 24 in the confirmation stage" in out
    assert "about 21 epochs expected with ASHA" in out and "at most 48" in out
    assert "each trial asks for: 1 worker(s) x (1 CPU, 0 GPU)" in out
    fits = os.cpu_count()
    assert f"fits {fits} trial(s) at once; {min(fits, 6)} will run at once" in out
    start = shlex.split(out.splitlines()[-1].removeprefix("start it with:"))
    assert start[-3:] == ["run", twist_spec_path, "--set=search.num_samples=6"]  # after the program, as it was started
    assert not list(tmp_path.iterdir())  # no store, no Ray directory: nothing was started


def test_validate_refuses_a_bad_spec_a_spec_without_ranges_and_one_the_cluster_cannot_fit(tmp_path, twist_spec_path, cli_here):
    status, _, err = cli_here("validate", twist_spec_path, "--set", "training.epoch=3")
    assert status == 2 and "training.epoch: unknown field" in err
    resolved = write_spec(tmp_path, {"name": "one", "method": {"name": "twist"}})
    status, _, err = cli_here("validate", str(resolved))
    assert status == 2 and "no search ranges" in err and "ssl-tune train" in err
    too_big = os.cpu_count() + 1
    status, _, err = cli_here("validate", twist_spec_path, "--set", f"resources.cpus_per_worker={too_big}")
    assert status == 2 and "does not fit on this machine" in err
    assert f"1 worker(s) x ({too_big} CPU, 0 GPU)" in err


def test_yaml_errors_name_the_file_line_and_column(tmp_path, capsys):
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: x\nmethod:\n  name: twist\n  tau: [1, 2\ntraining: {epochs: 2}\n")
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:5:9: not valid YAML" in err  # where the parser gave up (1-based, as editors count)
    assert "flow sequence that starts at line 4, column 8" in err  # and where the unclosed list began
    assert "training: {epochs: 2}\n          ^" in err
    assert "<unicode string>" not in err
    spec.write_text("name: x\n\tmethod: twist\n")
    assert main(["validate", str(spec)]) == 2
    assert f"{spec}:2:1: not valid YAML: found character '\\t'" in capsys.readouterr().err


def test_hints_call_ssl_tune_as_it_was_started(monkeypatch, tmp_path):
    from ssl_tune.report import shell

    venv_script = tmp_path / "venv dir" / "bin" / "ssl-tune"
    venv_script.parent.mkdir(parents=True)
    venv_script.write_text("#!/bin/sh\n")
    venv_script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(venv_script), "run"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv(shell.LAUNCHER_ENV, raising=False)
    # not on PATH (the README's set-up): the script by the path it was called with, quoted for the shell
    assert shell.ssl_tune_command("export", "my search") == f"'{venv_script}' export 'my search'"
    monkeypatch.setenv("PATH", f"{venv_script.parent}:/usr/bin:/bin")  # an activated environment
    assert shell.ssl_tune_command("ui") == "ssl-tune ui"
    # started by scripts/in-venv.sh: that command, for the process it started only
    monkeypatch.setenv(shell.LAUNCHER_ENV, "bash scripts/in-venv.sh")
    monkeypatch.setenv(shell.LAUNCHER_PID_ENV, str(os.getpid()))
    assert shell.ssl_tune_command("ui") == "bash scripts/in-venv.sh ssl-tune ui"
    monkeypatch.setenv(shell.LAUNCHER_PID_ENV, str(os.getpid() + 1))  # a child of that process
    assert shell.ssl_tune_command("ui") == "ssl-tune ui"


def test_a_hint_from_in_venv_runs_as_printed(twist_spec_path):
    """Through the README's own launcher: the hint names the launcher, and pasting it works."""
    env = {k: v for k, v in cli_env().items() if not k.startswith("SSL_TUNE_LAUNCHER")}
    proc = subprocess.run(["bash", "scripts/in-venv.sh", "ssl-tune", "validate", twist_spec_path], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    hint = proc.stdout.splitlines()[-1].removeprefix("start it with:").strip()
    assert hint == f"bash scripts/in-venv.sh ssl-tune run {twist_spec_path}"
    pasted = subprocess.run(hint.replace(" run ", " validate ", 1), shell=True, cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=300)
    assert pasted.returncode == 0 and "a valid spec" in pasted.stdout, pasted.stderr


def test_ui_refuses_a_store_that_does_not_exist(tmp_path, cli_here):
    status, _, err = cli_here("ui")
    assert status == 2 and f"no MLflow tracking store at sqlite:///{tmp_path}/mlflow.db" in err
    assert not list(tmp_path.iterdir())


# --- a backbone's preprocessing ----------------------------------------------------------------


def test_preprocess_gives_the_trainers_input_from_pil_images_and_uint8_tensors(tmp_path):
    from PIL import Image

    from ssl_tune.data.imagefolder import fit_size, rgb_pixels

    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (5, 1, 28, 28), generator=g, dtype=torch.uint8)
    norm = Normalizer(grey)
    contract = InputContract(1, 28, tuple(norm.mean.flatten().tolist()), tuple(norm.std.flatten().tolist()), "x")
    preprocess = Preprocess(contract)
    assert torch.allclose(preprocess(grey), norm.uint8(grey), atol=1e-6)  # a batch
    assert torch.allclose(preprocess(grey[0]), norm.uint8(grey[:1])[0], atol=1e-6)  # one image
    pil = Image.fromarray(grey[0, 0].numpy())
    assert torch.allclose(preprocess(pil), norm.uint8(grey[:1])[0], atol=1e-6)
    # RGB input to a grey backbone: PIL's own luma conversion
    rgb = Image.fromarray(torch.randint(0, 256, (28, 28, 3), generator=g, dtype=torch.uint8).numpy())
    as_grey = torch.from_numpy(np.asarray(rgb.convert("L")).copy())[None]
    assert (preprocess(rgb) - norm.uint8(as_grey[None])[0]).abs().max() <= 1 / 255 / min(contract.std) + 1e-6
    # a larger RGB file for an RGB backbone: resized and cropped as the data cache decodes it
    rgb_contract = InputContract(3, 16, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "folder")
    big = rgb.resize((40, 32))
    path = tmp_path / "big.png"
    big.save(path)
    pixels = fit_size(torch.from_numpy(rgb_pixels(Image.open(path)).copy()), 16)  # torchvision's Resize + CenterCrop
    expected = (pixels.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / 0.2
    assert torch.allclose(Preprocess(rgb_contract)(big), expected, atol=1e-5)
    assert Preprocess(rgb_contract)(grey[:2]).shape == (2, 3, 16, 16)  # grey repeated to RGB
    with pytest.raises(TypeError, match="uint8"):
        preprocess(grey.float())
    assert "grey 28x28 images as on x" in repr(preprocess)


def test_load_backbone_says_in_one_line_what_it_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(LookupError) as raised:
        load_backbone("bset")
    message = str(raised.value)
    assert "\n" not in message
    for tried in (f"no export directory or checkpoint {tmp_path / 'bset'}", "not a run id, search or experiment",
                  f"sqlite:///{tmp_path}/mlflow.db", "not a registered model (models:/NAME/VERSION)"):
        assert tried in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(LookupError, match="neither an export directory"):
        load_backbone("empty")
    with pytest.raises(LookupError, match="no MLflow tracking store"):
        load_backbone("models:/nothing/1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no store was created


# --- tests that need a system package ---------------------------------------------------------


def test_a_missing_system_package_skips_with_its_install_command_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="install it with: apt-get install -y thing"):
        require_system(False, "Thing", "apt-get install -y thing")
    monkeypatch.setenv("CI", "false")
    assert not on_ci()
    with pytest.raises(pytest.skip.Exception):
        require_system(False, "Thing", "apt-get install -y thing")
    for value in ("1", "true"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="CI lacks Thing"):
            require_system(False, "Thing", "apt-get install -y thing")
    require_system(True, "Thing", "apt-get install -y thing")  # present: nothing happens


def test_ci_installs_every_system_package_the_tests_ask_for():
    from tests import conftest

    ci = (Path(ROOT) / ".ci" / "run").read_text()
    for install in (conftest.CHROMIUM_INSTALL, conftest.POSTGRES_INSTALL):
        package = install.split()[-1]
        assert f"missing+=({package})" in ci, package
    assert "export CI=1" in ci and "bash scripts/in-venv.sh python -m pytest" in ci


def test_validate_shows_what_auto_chose_for_the_stem_and_the_gpus(monkeypatch, capsys, twist_spec_path):
    from ssl_tune.report import preview

    assert main(["validate", twist_spec_path, "--set", "backbone.name=resnet18"]) == 0
    out = capsys.readouterr().out
    assert "backbone: resnet18 (11.17M parameters, 512 features) on 1 x 28 x 28 images; CIFAR stem" in out
    assert "backbone.cifar_stem auto at 28 px" in out
    assert "resources.gpus_per_worker: auto -> 0 (no node has a GPU)" in out
    eight_gpus = [{"id": "n1", "address": "10.0.0.1", "CPU": 64.0, "GPU": 8.0}]
    monkeypatch.setattr(preview, "_cluster_nodes", lambda address: ("the Ray cluster at head:6379", eight_gpus))
    assert main(["validate", twist_spec_path, "--set", "backbone.name=timm:vit_tiny_patch16_224",
                 "--set", "backbone.kwargs={img_size: 28, patch_size: 4}"]) == 0
    out = capsys.readouterr().out
    assert "backbone: timm:vit_tiny_patch16_224 (5.35M parameters, 192 features)" in out and "stem" not in out
    assert "1 worker(s) x (1 CPU, 1 GPU); resources.gpus_per_worker: auto -> 1 (the nodes have 8 GPU(s))" in out
    assert "fits 8 trial(s) at once" in out


def test_a_vit_that_cannot_take_the_images_and_ranks_sharing_a_gpu_are_refused_before_any_trial(
        capsys, monkeypatch, tmp_path, twist_spec_path):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", twist_spec_path, "--set", "backbone.name=timm:vit_tiny_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert "does not take 1 x 28 x 28 images" in err and "backbone.kwargs (timm: {img_size: 28}" in err
    assert main(["validate", twist_spec_path, "--set", "resources.num_workers=2", "--set", "training.batch_size=256",
                 "--set", "resources.gpus_per_worker=0.5"]) == 2
    err = capsys.readouterr().err
    assert "resources.gpus_per_worker 0.5 with resources.num_workers 2: ranks of one trial cannot share a GPU" in err
    assert len([line for line in err.splitlines() if "cannot share" in line]) == 1
    assert main(["run", twist_spec_path, "--set", "backbone.name=timm:vit_tiny_patch16_224"]) == 2
    assert "does not take 1 x 28 x 28 images" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no store, no Ray directory: refused before anything started
